"""Where a job's files live on local disk: `<root>/<job id>/input.<ext>` and `.../stems/`."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, fallback: str = "track") -> str:
    """A file name that is safe on every filesystem and in a URL path."""
    stem = _SAFE.sub("_", Path(name).name).strip("._") or fallback
    return stem[:120]


class LocalStorage:
    """Job folders under one root. In embedded mode the worker shares this disk."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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

    # The same operations as `core.objectstore`'s storage, for the dispatcher and delivery.

    async def delete_job(self, job_id: int) -> None:
        await asyncio.to_thread(self.delete, job_id)

    async def delete_input_async(self, job_id: int) -> None:
        await asyncio.to_thread(self.delete_input, job_id)

    async def has_stems(self, job_id: int, names: list[str]) -> bool:
        return all((self.stems_dir(job_id) / name).is_file() for name in names)

    async def copy_stems(self, source_job: int, target_job: int, names: list[str]) -> None:
        target = self.stems_dir(target_job)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            await asyncio.to_thread(_link_or_copy, self.stems_dir(source_job) / name, target / name)

    @asynccontextmanager
    async def open_stems(self, job_id: int, names: list[str]) -> AsyncIterator[Path]:
        """A folder holding the job's stems on this disk, while the context lasts."""
        yield self.stems_dir(job_id)

    async def stem_links(self, job_id: int, names: list[str], ttl_s: float) -> dict[str, str] | None:
        """Download links the storage signs itself; None: the bot's web server serves them."""
        return None

    async def publish_input(self, job) -> dict | None:
        """What a worker needs to reach the input: nothing, it shares this disk (workers
        on the bot's machine, STEMBOT_DATA_DIR the same)."""
        return None


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same disk: no copy, and each job can be deleted alone
    except OSError:
        shutil.copy2(source, target)


class LocalJobFiles:
    """A run's files in embedded mode: the model host shares the bot's disk, so it reads
    the input and writes the stems in place."""

    def __init__(self, storage: LocalStorage):
        self.storage = storage

    async def input_file(self, job) -> Path:
        return self.storage.input_path(job.id, job.source_name)

    def stems_dir(self, job) -> Path:
        return self.storage.stems_dir(job.id)

    async def publish(self, job, artifacts: dict) -> None:
        return None  # already where the bot delivers from

    async def discard(self, job) -> None:
        return None  # the bot removes the job's folder when the job ends


class ObjectStorage(LocalStorage):
    """Distributed mode with an S3-compatible store: job inputs and stems live there, under
    `<prefix>jobs/<id>/`; the local root is only a staging area (downloads in progress,
    stems on their way to Discord, challenge entries).

    Workers get presigned URLs for one job at a time (`publish_input`): a GET for the
    input and a POST limited to the job's stems prefix. They hold no credentials.
    """

    def __init__(self, root: Path, store, transfer_ttl_s: float, max_output_bytes: int):
        super().__init__(root)
        self.store = store  # core.objectstore.ObjectStore
        self.transfer_ttl_s = transfer_ttl_s
        self.max_output_bytes = max_output_bytes

    async def start(self) -> None:
        await self.store.start()
        await self.store.ensure_bucket()

    async def close(self) -> None:
        await self.store.close()

    async def publish_input(self, job) -> dict:
        """Upload the job's input; return the presigned URLs a worker needs."""
        path = self.input_path(job.id, job.source_name)
        key = self.store.input_key(job.id, path.suffix)
        await self.store.put_file(key, path)
        return {
            "input_url": await self.store.presign_get(key, self.transfer_ttl_s),
            "input_suffix": path.suffix,
            "stems_post": await self.store.presign_post(self.store.stems_prefix(job.id), self.transfer_ttl_s,
                                                        self.max_output_bytes),
            "links_available": True,  # too large for Discord: presigned download links
        }

    async def delete_job(self, job_id: int) -> None:
        await super().delete_job(job_id)
        await self.store.delete_prefix(self.store.job_prefix(job_id))

    async def delete_input_async(self, job_id: int) -> None:
        await super().delete_input_async(job_id)
        await self.store.delete_prefix(self.store.input_key(job_id, ""))

    async def has_stems(self, job_id: int, names: list[str]) -> bool:
        prefix = self.store.stems_prefix(job_id)
        present = set(await self.store.list_keys(prefix))
        return all(prefix + name in present for name in names)

    async def copy_stems(self, source_job: int, target_job: int, names: list[str]) -> None:
        for name in names:
            await self.store.copy(self.store.stems_prefix(source_job) + name,
                                  self.store.stems_prefix(target_job) + name)

    @asynccontextmanager
    async def open_stems(self, job_id: int, names: list[str]) -> AsyncIterator[Path]:
        folder = self.job_dir(job_id) / "outgoing"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            prefix = self.store.stems_prefix(job_id)
            for name in names:
                await self.store.get_file(prefix + safe_filename(name), folder / safe_filename(name))
            yield folder
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)

    async def stem_links(self, job_id: int, names: list[str], ttl_s: float) -> dict[str, str]:
        prefix = self.store.stems_prefix(job_id)
        return {name: await self.store.presign_get(prefix + name, ttl_s, download_name=name) for name in names}
