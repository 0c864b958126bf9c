"""Job files in an S3-compatible store (distributed mode); the local root only stages."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.storage.local import JobFilesOf, LocalStorage, plain_name

if TYPE_CHECKING:
    from core.outages import Outage
    from core.storage.s3_client import S3Client


class S3Storage(LocalStorage):
    """Distributed mode with an S3-compatible store: job inputs and stems live there, under
    `<prefix>jobs/<id>/`; the local root is only a staging area (downloads in progress,
    stems on their way to Discord, challenge entries).

    Workers get presigned URLs for one job at a time (`publish_input`): a GET for the
    input and a POST for each file they may store, each for one exact key under the job's
    `stems/`. They hold no credentials. Those keys stay writable by whoever holds the
    POSTs until they expire, so the bot never delivers, links to or caches them: it
    downloads them, checks them (`core.jobs.results`), and stores the checked bytes under
    `checked/` (`keep_checked`), where no POST reaches. Delivery, download links and the
    results cache read only those copies.
    """

    def __init__(self, root: Path, store: S3Client, max_transfer_ttl_s: float) -> None:
        super().__init__(root)
        self.store = store
        self.max_transfer_ttl_s = max_transfer_ttl_s

    @property
    def outages(self) -> tuple[Outage, ...]:
        """The bucket: while calls wait on it, no new job is started (core.jobs.dispatcher)."""
        return (self.store.outage,)

    async def start(self) -> None:
        await self.store.start()
        await self.store.ensure_bucket()

    async def close(self) -> None:
        await self.store.close()

    async def publish_input(self, job: JobFilesOf, uploads: Mapping[str, int], ttl_s: float) -> dict[str, Any]:
        """Upload the job's input; return the presigned URLs a worker needs: a GET for the
        input and one POST per file of `uploads` (file name -> most bytes), all valid for
        `ttl_s` seconds (at most `max_transfer_ttl_s`). A file not named there cannot be stored."""
        ttl_s = min(ttl_s, self.max_transfer_ttl_s)
        # Nothing an earlier run left under this job's id (a run before a retry, a database
        # reset while the bucket was kept) may pass for this run's files or the bot's copies.
        await self.store.delete_prefix(self.store.stems_prefix(job.id))
        await self.store.delete_prefix(self.store.checked_prefix(job.id))
        path = self.input_path(job.id, job.source_name)
        key = self.store.input_key(job.id, path.suffix)
        await self.store.put_file(key, path)
        stems = self.store.stems_prefix(job.id)
        return {
            "input_url": await self.store.presign_get(key, ttl_s),
            "input_suffix": path.suffix,
            "stems_posts": {name: await self.store.presign_post(stems + plain_name(name), ttl_s, max_bytes)
                            for name, max_bytes in uploads.items()},
            "links_available": True,  # too large for Discord: presigned download links
        }

    async def delete_job(self, job_id: int) -> None:
        # The whole job prefix: the input, the worker's uploads and the bot's checked copies.
        await super().delete_job(job_id)
        await self.store.delete_prefix(self.store.job_prefix(job_id))

    async def delete_input_async(self, job_id: int) -> None:
        await super().delete_input_async(job_id)
        await self.store.delete_prefix(self.store.input_key(job_id, ""))

    async def has_stems(self, job_id: int, names: list[str]) -> bool:
        """Whether the bot holds checked copies of all these files (the worker's uploads
        do not count: they may have changed since they were checked)."""
        prefix = self.store.checked_prefix(job_id)
        present = set(await self.store.list_keys(prefix))
        return all(prefix + plain_name(name) in present for name in names)

    async def copy_stems(self, source_job: int, target_job: int, names: list[str]) -> None:
        for name in map(plain_name, names):
            await self.store.copy(self.store.checked_prefix(source_job) + name,
                                  self.store.checked_prefix(target_job) + name)

    @asynccontextmanager
    async def open_stems(self, job_id: int, names: list[str]) -> AsyncIterator[Path]:
        """The job's files in a local folder while the context lasts: the bot's checked
        copies when it holds them all (a cache hit, a delivery tried again), else the
        worker's uploads, which the caller checks and then keeps with `keep_checked`."""
        folder = self.job_dir(job_id) / "outgoing"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            source = self.store.checked_prefix(job_id)
            if not await self.has_stems(job_id, names):
                source = self.store.stems_prefix(job_id)
            for name in names:
                # Names the bot made (core.jobs.results); a path would write outside `folder`.
                name = plain_name(name)
                await self.store.get_file(source + name, folder / name)
            yield folder
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)

    async def keep_checked(self, job_id: int, folder: Path, names: list[str]) -> None:
        """Store the files of `folder`, which the bot has just checked, as its own copies
        under `checked/`: the bytes checked are the bytes kept, whatever a worker uploads
        meanwhile. Then the worker's uploads go (nothing reads them any more)."""
        if await self.has_stems(job_id, names):
            return  # `open_stems` read the bot's own copies: nothing new to keep
        prefix = self.store.checked_prefix(job_id)
        for name in map(plain_name, names):
            await self.store.put_file(prefix + name, folder / name)
        await self.store.delete_prefix(self.store.stems_prefix(job_id))

    async def stem_links(self, job_id: int, names: list[str], ttl_s: float) -> dict[str, str]:
        prefix = self.store.checked_prefix(job_id)
        return {name: await self.store.presign_get(prefix + plain_name(name), ttl_s, download_name=name)
                for name in names}
