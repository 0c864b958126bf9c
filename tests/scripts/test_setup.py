"""scripts/setup and the lock files: a set-up installs exactly the locked set, the same on
every machine and every day, and refuses a lock that pyproject.toml has outgrown."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a fresh clone holds that set-up reads (the rest of the tree is not needed).
CHECKOUT = ("pyproject.toml", "README.md", "alembic.ini", "requirements", "scripts", "core", "bot", "stembot",
            "migrations")


def checkout_copy(dest: Path) -> Path:
    dest.mkdir()
    for name in CHECKOUT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, dest / name)
    return dest


def freeze(python: Path) -> str:
    """The installed distributions and versions, as `pip freeze` prints them (stembot itself,
    installed from the checkout, left out: its path differs)."""
    return subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                          capture_output=True, text=True, check=True).stdout


def lockfile(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "lockfile.py"), *args], capture_output=True,
                          text=True)


def test_the_locks_match_pyproject():
    result = lockfile("check", str(ROOT / "requirements" / "app.lock"), str(ROOT / "requirements" / "test.lock"))
    assert result.returncode == 0, result.stderr


def test_a_lock_older_than_pyproject_is_refused_before_anything_is_installed(tmp_path):
    checkout = checkout_copy(tmp_path / "clone")
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"tqdm>=4.60",', '"tqdm>=4.60",\n    "tomli-w>=1.0",', 1))
    assert "tomli-w" in pyproject.read_text()

    result = subprocess.run([str(checkout / "scripts" / "setup"), "test"], capture_output=True, text=True,
                            env={**os.environ, "STEMBOT_VENV": str(tmp_path / "venv")}, timeout=120)
    assert result.returncode == 1
    assert "requirements/test.lock does not match pyproject.toml" in result.stderr
    assert "run scripts/lock" in result.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_a_second_set_up_installs_exactly_the_same_versions(tmp_path):
    """Two set-ups of the same commit (this test's environment, made by scripts/test, and a
    fresh one) hold byte-identical package lists; a package the lock does not list goes."""
    checkout = checkout_copy(tmp_path / "clone")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Something installed by hand before set-up: the locked set has no place for it.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "tomli-w==1.2.0"], check=True)

    # Without byte-compiling its 18,000 modules, which the package list does not depend on:
    # pip reads a "no-" option's variable inverted, so 0 means --no-compile.
    result = subprocess.run([str(checkout / "scripts" / "setup"), "test"], capture_output=True, text=True,
                            env={**os.environ, "STEMBOT_VENV": str(venv), "PIP_NO_COMPILE": "0"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removing what test.lock does not list: tomli-w" in result.stderr

    ours, theirs = freeze(Path(sys.executable)), freeze(venv / "bin" / "python")
    assert "demucs==4.1.0" in theirs and "tomli-w" not in theirs.lower()
    assert theirs == ours
    version = subprocess.run([str(venv / "bin" / "stembot"), "--help"], capture_output=True, text=True)
    assert version.returncode == 0 and "separate" in version.stdout
