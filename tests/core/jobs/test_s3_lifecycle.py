"""A job's objects in a real S3 bucket (moto on loopback): removed at retention and by
/forget (`Sweeper.expire`, which the /forget command calls), and the results cache served
from the bot's checked copies in the bucket (`Dispatcher.prepare`)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta
from pathlib import Path

import pytest_asyncio

from core.db import utcnow
from core.jobs.dispatcher import AttachedBackend, Dispatcher, DispatcherConfig
from core.jobs.job import Job, JobState
from core.jobs.sweeper import Sweeper
from core.storage.file_digest import file_sha256
from core.storage.s3_client import S3Client
from core.storage.s3_storage import S3Storage
from tests.support.quota_db import FIELDS, open_db

DAY_S = 86400.0
STEMS = ("drums", "bass", "other", "vocals")
SECONDS = 3.0


@pytest_asyncio.fixture
async def storage(s3_server, tmp_path):
    config = dataclasses.replace(s3_server, prefix=f"t-{uuid.uuid4().hex[:8]}/")
    opened = S3Storage(tmp_path / "jobs", S3Client(config), max_transfer_ttl_s=3600)
    await opened.start()
    yield opened
    await opened.close()


@pytest_asyncio.fixture
async def db(sqlite_url):
    async with open_db(sqlite_url) as db:
        yield db


def artifacts() -> dict:
    return {"files": {s: f"{s}.mp3" for s in STEMS}, "sizes": dict.fromkeys(STEMS, 5),
            "format": {"name": "mp3", "mp3_bitrate_kbps": 320}, "mode": "attach", "note": None, "preview": None}


async def delivered(db, storage: S3Storage, user: int, days_ago: float, song: bytes = b"RIFF a song") -> Job:
    """A job that ended `days_ago` days ago with every kind of object in the bucket: its
    input, the worker's uploads and the bot's checked copies (a delivery leaves only the
    last; one cut short by a stop, all three)."""
    store = db.store()
    job = await store.create(**{**FIELDS, "stems": "all"}, user_id=user, guild_id=5)
    path = storage.input_path(job.id, job.source_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(song)
    await storage.publish_input(job, {f"{s}.mp3": 1000 for s in STEMS}, ttl_s=600)  # the input's key
    for stem in STEMS:
        stem_file = path.parent / f"{stem}.mp3"
        stem_file.write_bytes(f"{stem} of job {job.id}".encode())
        await storage.store.put_file(storage.store.stems_prefix(job.id) + stem_file.name, stem_file)
        await storage.store.put_file(storage.store.checked_prefix(job.id) + stem_file.name, stem_file)
    finished = utcnow() - timedelta(days=days_ago)
    await store.update(job.id, state=JobState.done.value, finished_at=finished, delivered_at=finished,
                       artifacts=artifacts(), duration_s=SECONDS, input_sha256=file_sha256(path))
    return await store.require(job.id)


async def keys(storage: S3Storage, job_id: int) -> list[str]:
    return await storage.store.list_keys(storage.store.job_prefix(job_id))


async def test_retention_removes_a_jobs_objects_from_the_bucket(db, storage):
    old = await delivered(db, storage, user=1, days_ago=2)
    young = await delivered(db, storage, user=1, days_ago=0.1)
    assert len(await keys(storage, old.id)) == 1 + 2 * len(STEMS)  # input, uploads, checked copies
    sweeper = Sweeper(db.store(), storage, retention_s=DAY_S)

    report = await sweeper.sweep()

    assert report.expired == [old.id]
    assert await keys(storage, old.id) == []
    assert len(await keys(storage, young.id)) == 1 + 2 * len(STEMS)
    assert (await db.store().require(old.id)).artifacts_deleted_at is not None


async def test_forget_removes_only_that_members_finished_jobs_from_the_bucket(db, storage):
    mine = [await delivered(db, storage, user=1, days_ago=0.1) for _ in range(2)]
    theirs = await delivered(db, storage, user=2, days_ago=0.1)
    sweeper = Sweeper(db.store(), storage, retention_s=DAY_S)

    assert sorted(await sweeper.expire(utcnow(), user_id=1)) == [job.id for job in mine]  # what /forget runs

    for job in mine:
        assert await keys(storage, job.id) == []
    assert len(await keys(storage, theirs.id)) == 1 + 2 * len(STEMS)
    assert await sweeper.expire(utcnow(), user_id=1) == []  # nothing left to forget


class Received:
    """A notifier that takes a delivery the way the bot does: the job's files from storage."""

    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage
        self.files: dict[int, dict[str, bytes]] = {}

    async def job_changed(self, job: Job) -> None:
        return None

    async def deliver(self, job: Job) -> None:
        names = list(job.artifacts["files"].values())
        async with self.storage.open_stems(job.id, names) as folder:
            self.files[job.id] = {name: (Path(folder) / name).read_bytes() for name in names}

    async def job_ended(self, job: Job) -> None:
        return None


class NoExecution(AttachedBackend):
    """Nothing runs: a job served from the cache never reaches a worker."""


async def test_the_cache_serves_the_checked_copies_from_the_bucket(db, storage):
    first = await delivered(db, storage, user=1, days_ago=0.1)
    store = db.store()
    again = await store.create(**{**FIELDS, "stems": "all"}, user_id=2, guild_id=5, attachment_size_limit=10 << 20)
    path = storage.input_path(again.id, again.source_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF a song")  # the same audio, fetched
    await store.update(again.id, state=JobState.fetching.value)  # claimed
    # A worker rewrites its uploads after the check: the cache must not serve those.
    tampered = path.parent / "vocals.mp3"
    tampered.write_bytes(b"tampered")
    await storage.store.put_file(storage.store.stems_prefix(first.id) + "vocals.mp3", tampered)
    notifier = Received(storage)
    dispatcher = Dispatcher(store, storage, notifier, NoExecution(), DispatcherConfig(worker_name="bot"))

    # Answered from the cache, the delivery awaited (it is shielded from a stop).
    assert not await dispatcher.prepare(await store.require(again.id))

    served = await store.require(again.id)
    assert served.job_state is JobState.done and served.cache_hit
    assert notifier.files[again.id] == {f"{s}.mp3": f"{s} of job {first.id}".encode() for s in STEMS}
    copied = await storage.store.list_keys(storage.store.checked_prefix(again.id))
    assert sorted(copied) == sorted(storage.store.checked_prefix(again.id) + f"{s}.mp3" for s in STEMS)
