"""The object store going away for real (tests/support/s3.py's OutageProxy in front of
moto: connections cut, every request answered 503 ServiceUnavailable): the bot's calls
(core.storage.s3_client) and a worker's transfers through presigned URLs
(core.distributed.queue_worker.RemoteJobFiles) wait for it within their budget instead of
failing, a 4xx fails at once, and a budget that runs out says which dependency stayed away."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from types import SimpleNamespace

import pytest

from core.distributed.queue_worker import RemoteJobFiles, StorageOutage
from core.outages import DependencyDown
from core.storage.s3_client import S3Client
from core.storage.s3_storage import S3Storage
from tests.support.s3 import OutageProxy


@pytest.fixture
async def proxy(s3_server):
    async with OutageProxy(s3_server.endpoint_url) as running:
        yield running


def through(proxy: OutageProxy, s3_server, **changes) -> S3Client:
    """A client of the test bucket that reaches the store through `proxy`."""
    return S3Client(dataclasses.replace(s3_server, endpoint_url=proxy.endpoint,
                                        prefix=f"o-{uuid.uuid4().hex[:8]}/", **changes))


async def test_a_call_waits_through_an_outage_and_goes_through_when_the_store_is_back(proxy, s3_server, tmp_path):
    source = tmp_path / "input.wav"
    source.write_bytes(b"RIFF" * 1000)
    async with through(proxy, s3_server, transient_retry_s=60) as store:
        await store.ensure_bucket()
        key = store.input_key(1, ".wav")
        proxy.down()
        put = asyncio.create_task(store.put_file(key, source))
        await asyncio.sleep(3)
        assert not put.done() and store.outage.down and proxy.refused > 0
        proxy.up()
        await asyncio.wait_for(put, 30)
        assert not store.outage.down
        assert await store.get_file(key, tmp_path / "back.wav") == 4000


async def test_a_refusal_fails_at_once(proxy, s3_server, tmp_path):
    async with through(proxy, s3_server, bucket=f"missing-{uuid.uuid4().hex[:8]}", transient_retry_s=60) as store:
        started = time.monotonic()
        with pytest.raises(FileNotFoundError):  # NoSuchBucket: a 404, nothing to wait for
            await store.get_file(store.input_key(1, ".wav"), tmp_path / "x")
        assert time.monotonic() - started < 5 and not store.outage.down


async def test_a_budget_that_runs_out_names_the_store(proxy, s3_server):
    async with through(proxy, s3_server, transient_retry_s=1) as store:
        await store.ensure_bucket()
        proxy.down()
        with pytest.raises(DependencyDown) as raised:
            await store.list_keys(store.prefix)
        assert raised.value.name == "the object store" and not store.outage.down


async def test_a_workers_transfers_wait_through_an_outage(proxy, s3_server, tmp_path):
    storage = S3Storage(tmp_path / "bot", through(proxy, s3_server), max_transfer_ttl_s=3600)
    await storage.start()
    try:
        job = SimpleNamespace(id=7, source_name="song.wav")
        path = storage.input_path(job.id, job.source_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF input")
        job.transfer = await storage.publish_input(job, {"vocals.mp3": 100}, ttl_s=600)
        files = RemoteJobFiles(tmp_path / "worker", tmp_path / "shared", max_input_bytes=1000, transient_retry_s=60)
        proxy.down()
        download = asyncio.create_task(files.input_file(job))
        await asyncio.sleep(3)
        assert not download.done() and files.outage.down
        proxy.up()
        assert (await asyncio.wait_for(download, 30)).read_bytes() == b"RIFF input"

        short = RemoteJobFiles(tmp_path / "worker2", tmp_path / "shared", max_input_bytes=1000, transient_retry_s=1)
        (short.stems_dir(job)).mkdir(parents=True)
        (short.stems_dir(job) / "vocals.mp3").write_bytes(b"v")
        proxy.down()
        with pytest.raises(StorageOutage) as failed:
            await short.publish(job, {"files": {"vocals": "vocals.mp3"}})
        assert "nothing was charged" in failed.value.reason and "http" not in failed.value.reason
    finally:
        proxy.up()
        await storage.close()
