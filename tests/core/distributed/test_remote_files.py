"""core.distributed.queue_worker.RemoteJobFiles: a worker stores a job's stems through the
job's presigned POSTs, one per file the bot expects, against a real S3 server (moto)."""

from __future__ import annotations

import dataclasses
import uuid
from types import SimpleNamespace

import pytest

from core.distributed.queue_worker import RemoteJobFiles, StorageUnreachable
from core.storage.s3_client import S3Client
from core.storage.s3_storage import S3Storage


@pytest.fixture
async def storage(s3_server, tmp_path):
    config = dataclasses.replace(s3_server, prefix=f"r-{uuid.uuid4().hex[:8]}/")
    opened = S3Storage(tmp_path / "bot", S3Client(config), max_transfer_ttl_s=3600)
    await opened.start()
    yield opened
    await opened.close()


async def handed_over(storage: S3Storage, job_id: int, uploads: dict[str, int]) -> SimpleNamespace:
    """A job as a worker reads it from its row: the presigned URLs the bot made."""
    job = SimpleNamespace(id=job_id, source_name="song.wav")
    path = storage.input_path(job_id, job.source_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF input")
    job.transfer = await storage.publish_input(job, uploads, ttl_s=600)
    return job


def made(files: RemoteJobFiles, job, contents: dict[str, bytes]) -> dict:
    folder = files.stems_dir(job)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    stems = {name.split(".")[0]: name for name in contents if name != "preview.png"}
    return {"files": stems, "preview": "preview.png" if "preview.png" in contents else None}


async def test_the_expected_files_land_at_their_keys(storage, tmp_path):
    files = RemoteJobFiles(tmp_path / "worker", tmp_path / "shared", max_input_bytes=1000)
    job = await handed_over(storage, 1, {"vocals.mp3": 100, "no_vocals.mp3": 100, "preview.png": 100})
    await files.publish(job, made(files, job, {"vocals.mp3": b"v", "no_vocals.mp3": b"n", "preview.png": b"p"}))
    prefix = storage.store.stems_prefix(1)
    assert await storage.store.list_keys(storage.store.job_prefix(1) + "stems/") == sorted(
        prefix + name for name in ("vocals.mp3", "no_vocals.mp3", "preview.png"))


async def test_a_file_the_bot_did_not_expect_fails_the_upload_before_any_is_stored(storage, tmp_path):
    files = RemoteJobFiles(tmp_path / "worker", tmp_path / "shared", max_input_bytes=1000)
    job = await handed_over(storage, 2, {"vocals.mp3": 100, "preview.png": 100})
    with pytest.raises(StorageUnreachable) as refused:
        await files.publish(job, made(files, job, {"vocals.mp3": b"v", "synth.mp3": b"s"}))
    assert "synth.mp3" in refused.value.reason
    assert await storage.store.list_keys(storage.store.job_prefix(2) + "stems/") == []
