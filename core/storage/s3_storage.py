"""Job files in an S3-compatible store (distributed mode); the local root only stages."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.storage.local import JobFilesOf, LocalStorage, plain_name

if TYPE_CHECKING:
    from core.storage.s3_client import S3Client


class S3Storage(LocalStorage):
    """Distributed mode with an S3-compatible store: job inputs and stems live there, under
    `<prefix>jobs/<id>/`; the local root is only a staging area (downloads in progress,
    stems on their way to Discord, challenge entries).

    Workers get presigned URLs for one job at a time (`publish_input`): a GET for the
    input and a POST limited to the job's stems prefix. They hold no credentials.
    """

    def __init__(self, root: Path, store: S3Client, transfer_ttl_s: float, max_output_bytes: int) -> None:
        super().__init__(root)
        self.store = store
        self.transfer_ttl_s = transfer_ttl_s
        self.max_output_bytes = max_output_bytes

    async def start(self) -> None:
        await self.store.start()
        await self.store.ensure_bucket()

    async def close(self) -> None:
        await self.store.close()

    async def publish_input(self, job: JobFilesOf) -> dict[str, Any]:
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
        return all(prefix + plain_name(name) in present for name in names)

    async def copy_stems(self, source_job: int, target_job: int, names: list[str]) -> None:
        for name in map(plain_name, names):
            await self.store.copy(self.store.stems_prefix(source_job) + name,
                                  self.store.stems_prefix(target_job) + name)

    @asynccontextmanager
    async def open_stems(self, job_id: int, names: list[str]) -> AsyncIterator[Path]:
        folder = self.job_dir(job_id) / "outgoing"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            prefix = self.store.stems_prefix(job_id)
            for name in names:
                # Names the bot made (core.jobs.results); a path would write outside `folder`.
                name = plain_name(name)
                await self.store.get_file(prefix + name, folder / name)
            yield folder
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)

    async def stem_links(self, job_id: int, names: list[str], ttl_s: float) -> dict[str, str]:
        prefix = self.store.stems_prefix(job_id)
        return {name: await self.store.presign_get(prefix + name, ttl_s, download_name=name) for name in names}
