"""An operator's secrets in the environment, and what helper processes saw of it.

`put_secrets` sets the bot's and a worker's secrets as environment variables, as an
operator would (plus one under a name stembot has never heard of). `ToolRecorder` puts
`ffmpeg` and `ffprobe` first on PATH: small scripts that save the environment they were
started with (their own /proc/<pid>/environ) and then run the real program.
`ChildWatcher` reads the environment of this process's spawned children while they run.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

SECRETS = {
    "STEMBOT_DISCORD_TOKEN": "MTIzNDU2Nzg5.discord-token-never-in-a-helper",
    "AWS_ACCESS_KEY_ID": "AKIAHELPERSNEVERSEEME",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-key-never-in-a-helper",
    "STEMBOT_S3_SECRET_ACCESS_KEY": "s3-secret-never-in-a-helper",
    "STEMBOT_DATABASE_URL": "postgresql://stembot:db-password-never-in-a-helper@db.internal/stembot",
    "STEMBOT_LINK_SECRET": "link-secret-never-in-a-helper",
    "MY_SECRET_API_KEY": "a-secret-under-a-name-nobody-listed",
}


def put_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return SECRETS


def parse_environ(raw: bytes) -> dict[str, str]:
    """The variables of a /proc/<pid>/environ."""
    pairs = (entry.decode("utf-8", "replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {name: value for name, _, value in pairs}


def leaked(raw: bytes) -> list[str]:
    """The secrets whose name or value is anywhere in `raw` (a /proc/<pid>/environ)."""
    return [name for name, value in SECRETS.items() if name.encode() in raw or value.encode() in raw]


_RECORDING_SCRIPT = """#!/bin/sh
cat /proc/$$/environ > "{folder}/{tool}.$$.environ"
exec "{real}" "$@"
"""


class ToolRecorder:
    """`ffmpeg` and `ffprobe` found first on PATH, saving each run's environment."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch, tools: tuple[str, ...] = ("ffmpeg", "ffprobe")):
        self.folder = folder
        bin_dir = folder / "bin"
        bin_dir.mkdir(parents=True)
        for tool in tools:
            real = shutil.which(tool)
            assert real is not None, f"{tool} is not installed"
            script = bin_dir / tool
            script.write_text(_RECORDING_SCRIPT.format(folder=folder, tool=tool, real=real))
            script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def runs(self) -> list[tuple[str, bytes]]:
        """(tool, the environment it was started with) for each run so far."""
        return sorted((path.name.split(".")[0], path.read_bytes()) for path in self.folder.glob("*.environ"))


class ChildWatcher:
    """Reads, every millisecond, the environment of each child of this process whose
    command line contains `marker` (a spawned multiprocessing child by default)."""

    def __init__(self, marker: bytes = b"--multiprocessing-fork"):
        self.marker = marker
        self.seen: dict[int, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ChildWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid in _children(me):
                if pid in self.seen:
                    continue
                try:
                    # Before its exec a child still shows our command line (and environment);
                    # after it, both are the new program's.
                    if self.marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                        self.seen[pid] = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:  # gone already
                    pass
            time.sleep(0.001)


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses.
        if int(stat.rpartition(")")[2].split()[1]) == parent:
            found.append(int(entry))
    return found
