"""Where a job's files live on local disk: `<root>/<job id>/input.<ext>` and `.../stems/`."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from core.outages import Outage

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, fallback: str = "track") -> str:
    """A file name that is safe on every filesystem and in a URL path."""
    stem = _SAFE.sub("_", Path(name).name).strip("._") or fallback
    return stem[:120]


def plain_name(name: str) -> str:
    """`name` if it names a file right in a folder; else ValueError. Stem names come from a
    job's row, which a worker writes: they must never lead elsewhere."""
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"not a plain file name: {name!r:.80}")
    return name


class LocalStorage:
    """Job folders under one root. In embedded mode the worker shares this disk."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def outages(self) -> tuple[Outage, ...]:
        """The remote services behind this storage whose outages hold new jobs back: none."""
        return ()

    def job_dir(self, job_id: int) -> Path:
        return self.root / str(int(job_id))

    def input_path(self, job_id: int, source_name: str) -> Path:
        suffix = Path(safe_filename(source_name)).suffix.lower()[:10]
        return self.job_dir(job_id) / f"input{suffix}"

    def stems_dir(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "stems"

    def stem_file(self, job_id: int, name: str) -> Path:
        path = (self.stems_dir(job_id) / name).resolve()
        if self.stems_dir(job_id).resolve() not in path.parents:
            raise ValueError("path escapes the job folder")
        return path

    def delete(self, job_id: int) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def delete_input(self, job_id: int) -> None:
        for path in self.job_dir(job_id).glob("input*"):
            path.unlink(missing_ok=True)

    # The same operations as `core.storage.s3_client`'s storage, for the dispatcher and delivery.

    async def delete_job(self, job_id: int) -> None:
        await asyncio.to_thread(self.delete, job_id)

    async def delete_input_async(self, job_id: int) -> None:
        await asyncio.to_thread(self.delete_input, job_id)

    async def has_stems(self, job_id: int, names: list[str]) -> bool:
        return all((self.stems_dir(job_id) / plain_name(name)).is_file() for name in names)

    async def copy_stems(self, source_job: int, target_job: int, names: list[str]) -> None:
        target = self.stems_dir(target_job)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            name = plain_name(name)
            await asyncio.to_thread(_link_or_copy, self.stems_dir(source_job) / name, target / name)

    @asynccontextmanager
    async def open_stems(self, job_id: int, names: list[str]) -> AsyncIterator[Path]:
        """A folder holding the job's stems on this disk, while the context lasts."""
        yield self.stems_dir(job_id)

    async def stem_links(self, job_id: int, names: list[str], ttl_s: float) -> dict[str, str] | None:
        """Download links the storage signs itself; None: the bot's web server serves them."""
        return None

    async def keep_checked(self, job_id: int, folder: Path, names: list[str]) -> None:
        """Keep the files of `folder` that the bot checked as the copies it delivers, links to
        and serves from the cache. Here they already are: `open_stems` gave the job's own
        folder, which the bot's model host wrote (embedded mode). Workers that share this
        disk (distributed mode without an object store) can write there too: see the
        trust boundaries in docs/architecture.md."""
        return None

    async def publish_input(self, job: JobFilesOf, uploads: Mapping[str, int], ttl_s: float) -> dict[str, Any] | None:
        """What a worker needs to reach the input and store `uploads` (file name -> most
        bytes) for `ttl_s` seconds: nothing, it shares this disk (workers on the bot's
        machine, STEMBOT_DATA_DIR the same)."""
        return None


class JobFilesOf(Protocol):
    """What storage reads of a job (a core.jobs.job.Job; storage sits below core.jobs)."""

    @property
    def id(self) -> int: ...

    @property
    def source_name(self) -> str: ...


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same disk: no copy, and each job can be deleted alone
    except OSError:
        shutil.copy2(source, target)


class LocalJobFiles:
    """A run's files in embedded mode: the model host shares the bot's disk, so it reads
    the input and writes the stems in place."""

    def __init__(self, storage: LocalStorage) -> None:
        self.storage = storage

    async def input_file(self, job: JobFilesOf) -> Path:
        return self.storage.input_path(job.id, job.source_name)

    def stems_dir(self, job: JobFilesOf) -> Path:
        return self.storage.stems_dir(job.id)

    async def publish(self, job: JobFilesOf, artifacts: dict[str, Any]) -> None:
        return None  # already where the bot delivers from

    async def discard(self, job: JobFilesOf) -> None:
        return None  # the bot removes the job's folder when the job ends


