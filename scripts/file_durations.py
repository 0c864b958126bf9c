"""Per-file test times, for the order the suite runs its files in (tests/conftest.py).

    scripts/test -q --durations=0 > run.log
    .venv/bin/python scripts/file_durations.py run.log > tests/file_durations.json

Reads pytest's `--durations=0` table and sums setup, call and teardown per test file.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

_ROW = re.compile(r"^\s*(\d+(?:\.\d+)?)s (?:setup|call|teardown)\s+([^\s:]+\.py)::")


def file_durations(log: str) -> dict[str, float]:
    """Seconds per test file, longest first, from pytest's durations table."""
    totals: Counter[str] = Counter()
    for line in log.splitlines():
        row = _ROW.match(line)
        if row:
            totals[row.group(2)] += float(row.group(1))
    return {path: round(seconds, 1) for path, seconds in totals.most_common()}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    durations = file_durations(Path(argv[0]).read_text(errors="replace"))
    if not durations:
        print(f"error: no durations table in {argv[0]} (run pytest with --durations=0)", file=sys.stderr)
        return 1
    json.dump(durations, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
