"""The lock files under requirements/: do they match pyproject.toml, and does a virtual
environment hold exactly what they list.

    python scripts/lockfile.py fingerprint             the fingerprint of pyproject.toml's dependencies
    python scripts/lockfile.py header LOCK TEXT        write LOCK's header: TEXT and that fingerprint
    python scripts/lockfile.py check LOCK [LOCK ...]   exit 1 when a lock is older than pyproject.toml
    python scripts/lockfile.py sync LOCK               (run by the venv's python) uninstall what LOCK lacks
    python scripts/lockfile.py pip-check               (run by the venv's python) `pip check`, UNLOCKED aside

Standard library only: scripts/setup runs it before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT_LINE = "# pyproject-sha256: "
REFRESH = "run scripts/lock (then scripts/setup again)"
# Installed beside the lock on purpose: what `python -m venv` puts in every environment
# (pip, and setuptools before Python 3.12), the project itself, and PyTorch with whatever
# its chosen build needs (a CUDA build brings its own libraries).
KEPT = {"pip", "setuptools", "stembot"}
# Required by a locked package but left out of the locks on purpose (scripts/lock): diffq, which
# audio-separator declares for its own Demucs runner (stembot never imports it) and which
# comes only as source needing a C compiler.
UNLOCKED = {"diffq"}
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", re.MULTILINE)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fingerprint(pyproject: Path) -> str:
    """A hash of what the locks are made from: Python version, dependencies, extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    inputs = {key: project.get(key) for key in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(FINGERPRINT_LINE):
            return line[len(FINGERPRINT_LINE):].strip()
    return None


def write_header(lock: Path, text: str, pyproject: Path) -> None:
    # pip-compile's own top-level comments go too (its note on the unpinned torch).
    body = [line for line in lock.read_text().splitlines() if not line.startswith("#")]
    while body and not body[0].strip():
        body.pop(0)
    header = [f"# {line}" if line else "#" for line in text.splitlines()]
    lock.write_text("\n".join([*header, FINGERPRINT_LINE + fingerprint(pyproject), "", *body]) + "\n")


def check(locks: list[Path], pyproject: Path) -> int:
    expected = fingerprint(pyproject)
    stale = [lock for lock in locks if recorded(lock) != expected]
    for lock in stale:
        print(f"error: {lock.relative_to(ROOT) if lock.is_relative_to(ROOT) else lock} does not match "
              f"{pyproject.name} (its dependencies changed since the lock was made): {REFRESH}", file=sys.stderr)
    return 1 if stale else 0


def locked_names(lock: Path) -> set[str]:
    return {canonical(name) for name in _NAME.findall(lock.read_text())}


def requirement_closure(root: str) -> set[str]:
    """`root` and every installed distribution it needs, transitively."""
    seen: set[str] = set()
    todo = [canonical(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            todo.append(canonical(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]))
    return seen


def sync(lock: Path) -> int:
    """Uninstall from the running interpreter's environment what neither the lock nor
    PyTorch's build needs: set-up installs exactly the locked set."""
    wanted = locked_names(lock) | KEPT | requirement_closure("torch")
    installed = {canonical(dist.metadata["Name"]) for dist in metadata.distributions()}
    extra = sorted(installed - wanted)
    if extra:
        print(f"removing what {lock.name} does not list: {', '.join(extra)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", *extra], check=True)
    return 0


def pip_check() -> int:
    """`pip check` of the running interpreter's environment; a missing UNLOCKED package is fine."""
    done = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
                          capture_output=True, text=True)
    if done.returncode == 0:
        return 0
    missing = re.compile(r"requires ([A-Za-z0-9._-]+), which is not installed")
    problems = [line for line in done.stdout.splitlines()
                if line.strip() and not ((m := missing.search(line)) and canonical(m.group(1)) in UNLOCKED)]
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems or not done.stdout.strip() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fingerprint")
    header = commands.add_parser("header")
    header.add_argument("lock", type=Path)
    header.add_argument("text")
    checking = commands.add_parser("check")
    checking.add_argument("locks", type=Path, nargs="+")
    syncing = commands.add_parser("sync")
    syncing.add_argument("lock", type=Path)
    commands.add_parser("pip-check")
    args = parser.parse_args(argv)
    if args.command == "fingerprint":
        print(fingerprint(args.pyproject))
        return 0
    if args.command == "header":
        write_header(args.lock, args.text, args.pyproject)
        return 0
    if args.command == "check":
        return check([lock.resolve() for lock in args.locks], args.pyproject)
    if args.command == "pip-check":
        return pip_check()
    return sync(args.lock)


if __name__ == "__main__":
    sys.exit(main())
