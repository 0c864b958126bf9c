"""core.storage.s3_storage against a real S3 server (moto on loopback): what a worker may
upload for a job, and the bot's own copies of what it checked, which delivery, download
links and the results cache use whatever the worker uploads afterwards.

Moto enforces no POST policy, so what S3 would allow is judged by `s3_accepts`
(tests/support/s3_policy.py); the worker's writes below are ones S3 would allow.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from core.storage.s3_client import S3Client
from core.storage.s3_storage import S3Storage
from core.storage.transfer import upload
from tests.support.s3_policy import expires_at, s3_accepts, signed_policy

GENUINE = b"ID3 genuine stem bytes" * 100
TAMPERED = b"ID3 the attacker's bytes" * 100


@pytest.fixture
async def storage(s3_server, tmp_path):
    config = dataclasses.replace(s3_server, prefix=f"t-{uuid.uuid4().hex[:8]}/")
    opened = S3Storage(tmp_path / "jobs", S3Client(config), max_transfer_ttl_s=3600)
    await opened.start()
    yield opened
    await opened.close()


def a_job(storage: S3Storage, job_id: int) -> SimpleNamespace:
    """A job whose input the bot fetched."""
    job = SimpleNamespace(id=job_id, source_name="song.wav")
    path = storage.input_path(job_id, job.source_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF input")
    return job


async def worker_uploads(post: dict, data: bytes, tmp_path: Path) -> None:
    """A worker storing `data` with one of its POSTs (as S3 would allow: its key, its size)."""
    source = tmp_path / f"w-{uuid.uuid4().hex[:6]}"
    source.write_bytes(data)
    await upload(post, source)


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.read()


async def test_a_worker_gets_one_policy_per_expected_file_and_nothing_else(storage):
    job = a_job(storage, 3)
    before = time.time()
    transfer = await storage.publish_input(job, {"vocals.mp3": 5000, "preview.png": 700}, ttl_s=900)
    posts = transfer["stems_posts"]
    assert set(posts) == {"vocals.mp3", "preview.png"}
    assert "stems_post" not in transfer  # no policy for a whole prefix
    store, bucket, now = storage.store, storage.store.bucket, time.time()
    for name, cap in (("vocals.mp3", 5000), ("preview.png", 700)):
        key = store.stems_prefix(3) + name
        policy = signed_policy(posts[name]["fields"])
        assert {"key": key} in policy["conditions"] and ["content-length-range", 1, cap] in policy["conditions"]
        assert before + 898 <= expires_at(policy) <= time.time() + 901
        assert s3_accepts(posts[name], bucket=bucket, key=key, size=cap, now=now)
        assert not s3_accepts(posts[name], bucket=bucket, key=key, size=cap + 1, now=now)
        assert not s3_accepts(posts[name], bucket=bucket, key=key, size=cap, now=now + 901)
    # An extra file, anywhere: no policy S3 would honour for it.
    for extra in ("drums.mp3", "vocals.mp3.html", "../checked/vocals.mp3"):
        for post in posts.values():
            assert not s3_accepts(post, bucket=bucket, key=store.stems_prefix(3) + extra, size=10, now=now)
    for post in posts.values():
        assert not s3_accepts(post, bucket=bucket, key=store.checked_prefix(3) + "vocals.mp3", size=10, now=now)
    # The input's GET lives as long.
    assert parse_qs(urlsplit(transfer["input_url"]).query)["X-Amz-Expires"] == ["900"]


async def test_transfer_urls_never_outlive_the_retention(storage):
    transfer = await storage.publish_input(a_job(storage, 4), {"bass.wav": 10}, ttl_s=7 * 24 * 3600)
    assert expires_at(signed_policy(transfer["stems_posts"]["bass.wav"]["fields"])) <= time.time() + 3601
    assert parse_qs(urlsplit(transfer["input_url"]).query)["X-Amz-Expires"] == ["3600"]


async def test_an_upload_name_that_is_a_path_gets_no_policy(storage):
    with pytest.raises(ValueError):
        await storage.publish_input(a_job(storage, 5), {"../input.wav": 10}, ttl_s=60)


async def test_delivery_links_and_cache_use_the_bytes_checked_whatever_the_worker_writes(storage, tmp_path):
    store = storage.store
    names = ["vocals.mp3", "preview.png"]
    transfer = await storage.publish_input(a_job(storage, 7), dict.fromkeys(names, 1 << 20), ttl_s=600)
    posts = transfer["stems_posts"]
    for name in names:
        await worker_uploads(posts[name], GENUINE, tmp_path)

    async with storage.open_stems(7, names) as folder:
        assert (folder / "vocals.mp3").read_bytes() == GENUINE  # what the bot checks
        # The worker overwrites its uploads between the check and the copy.
        for name in names:
            await worker_uploads(posts[name], TAMPERED, tmp_path)
        await storage.keep_checked(7, folder, names)
    assert await store.list_keys(store.stems_prefix(7)) == []  # the worker's uploads are gone
    assert await storage.has_stems(7, names)

    # After delivery the worker's policies still work (S3 would take these): they change nothing.
    for name in names:
        assert s3_accepts(posts[name], bucket=store.bucket, key=store.stems_prefix(7) + name,
                          size=len(TAMPERED), now=time.time())
        await worker_uploads(posts[name], TAMPERED, tmp_path)
    links = await storage.stem_links(7, names, ttl_s=60)
    assert all(urlsplit(url).path.split("/", 2)[2].startswith(store.checked_prefix(7)) for url in links.values())
    assert [await fetch(links[name]) for name in names] == [GENUINE, GENUINE]
    async with storage.open_stems(7, names) as folder:  # a delivery tried again
        assert (folder / "vocals.mp3").read_bytes() == GENUINE

    # The next identical request is served copies of the bot's copies.
    await storage.copy_stems(7, 8, names)
    async with storage.open_stems(8, names) as folder:
        assert (folder / "vocals.mp3").read_bytes() == GENUINE
        await storage.keep_checked(8, folder, names)
    assert [await fetch(url) for url in (await storage.stem_links(8, names, ttl_s=60)).values()] == [GENUINE] * 2

    # Retention and /forget delete the bot's copies with the rest of the job.
    await storage.delete_job(7)
    assert await store.list_keys(store.job_prefix(7)) == []
    assert not await storage.has_stems(7, names)


async def test_without_checked_copies_nothing_is_served_from_the_cache(storage, tmp_path):
    """A job whose stems only the worker stored (before this change, or not checked yet)."""
    transfer = await storage.publish_input(a_job(storage, 9), {"bass.wav": 1 << 20}, ttl_s=600)
    await worker_uploads(transfer["stems_posts"]["bass.wav"], GENUINE, tmp_path)
    assert not await storage.has_stems(9, ["bass.wav"])


async def test_a_job_handed_over_starts_with_no_files_of_an_earlier_run(storage, tmp_path):
    """The same job id again (a retry, or a database reset while the bucket was kept): the
    bot must not take what was stored before for this run's stems or its own copies."""
    store = storage.store
    stale = tmp_path / "stale"
    stale.write_bytes(TAMPERED)
    await store.put_file(store.stems_prefix(11) + "bass.wav", stale)
    await store.put_file(store.checked_prefix(11) + "bass.wav", stale)
    assert await storage.has_stems(11, ["bass.wav"])
    await storage.publish_input(a_job(storage, 11), {"bass.wav": 1 << 20}, ttl_s=600)
    assert await store.list_keys(store.job_prefix(11)) == [store.input_key(11, ".wav")]
    assert not await storage.has_stems(11, ["bass.wav"])
