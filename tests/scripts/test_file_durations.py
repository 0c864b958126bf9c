"""scripts/file_durations.py: per-file totals from pytest's durations table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOG = """\
============================= slowest durations ==============================
12.50s call     tests/a/test_one.py::test_x
2.25s setup    tests/a/test_one.py::test_y[param::with::colons]
0.25s teardown tests/a/test_one.py::test_y[param::with::colons]
40.00s call     tests/b/test_two_e2e.py::test_z
(120 durations < 0.005s hidden.  Use -vv to show these durations.)
1 failed, 3 passed in 55.00s
"""


def run(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "file_durations.py"), str(path)],
                          capture_output=True, text=True)


def test_sums_each_file_and_lists_the_longest_first(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    done = run(log)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:3] == [' "tests/b/test_two_e2e.py": 40.0,', ' "tests/a/test_one.py": 15.0']


def test_a_log_without_the_table_is_an_error(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("1 passed in 0.01s\n")
    done = run(log)
    assert done.returncode == 1 and "--durations=0" in done.stderr and not done.stdout
