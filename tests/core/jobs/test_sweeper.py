"""core.jobs.sweeper: settling leaked quota, retention, and leftover files."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta

import pytest
import pytest_asyncio

from core.db import utcnow
from core.jobs.job import JobState
from core.jobs.quotas import SERVER, utc_day
from core.jobs.sweeper import GRACE_S, UNATTACHED_AFTER_S, Sweeper
from core.storage.local import LocalStorage
from tests.support.quota_db import admit, open_db

G = 5
RETENTION_S = 3600.0


@pytest_asyncio.fixture
async def db(sqlite_url):
    async with open_db(sqlite_url) as db:
        yield db


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "files")


def age(path, seconds: float) -> None:
    moment = time.time() - seconds
    os.utime(path, (moment, moment))


def job_files(storage: LocalStorage, job_id: int, input_name: str = "input.mp3") -> None:
    """An input and a stems folder, as a delivered job leaves them."""
    stems = storage.stems_dir(job_id)
    stems.mkdir(parents=True)
    (stems / "vocals.mp3").write_bytes(b"v")
    (stems / "drums.mp3").write_bytes(b"d")
    (storage.job_dir(job_id) / input_name).write_bytes(b"in")


async def end_behind_the_stores_back(db, job_id: int, state: JobState) -> None:
    """End a job with a raw UPDATE, as a crash between two writes (or an old version) would
    leave it: final, but still holding its slot and reservation."""
    await db.sql("UPDATE jobs SET state = :state WHERE id = :id", state=state.value, id=job_id)


# -- settling --------------------------------------------------------------------------------


async def test_sweep_settles_jobs_that_ended_without_settling(database_url, storage):
    async with open_db(database_url) as db:
        store = db.store()
        sweeper = Sweeper(store, storage, RETENTION_S)
        done, failed, cancelled, running = [await admit(store, user_id=1) for _ in range(4)]
        for job, seconds in ((done, 60.0), (failed, 120.0), (running, 30.0)):
            await store.update(job.id, state=JobState.fetching.value)
            await store.reserve(job.id, seconds)
        today = utc_day()
        assert (await db.usage())[(G, 1, today)] == (0.0, 210.0)
        await end_behind_the_stores_back(db, done.id, JobState.done)
        await end_behind_the_stores_back(db, failed.id, JobState.failed)
        await end_behind_the_stores_back(db, cancelled.id, JobState.cancelled)
        assert await db.slots() == {(G, 1): 4, (G, SERVER): 4}  # leaked, until the sweep

        report = await sweeper.sweep()
        assert sorted(report.settled) == sorted([done.id, failed.id, cancelled.id])
        # The delivered job is charged, the others release; the running job keeps its minutes.
        assert await db.usage() == {(G, 1, today): (60.0, 30.0), (G, SERVER, today): (60.0, 30.0)}
        assert await db.slots() == {(G, 1): 1, (G, SERVER): 1}
        states = {job.id: (job.quota_state, job.slot_state) for job in await db.jobs()}
        assert states == {done.id: ("charged", "released"), failed.id: ("released", "released"),
                          cancelled.id: ("none", "released"), running.id: ("reserved", "held")}

        # Nothing is settled twice, by another sweep or a late transition.
        assert (await sweeper.sweep()).settled == []
        assert not await store.transition(done.id, JobState.done)
        assert await db.usage() == {(G, 1, today): (60.0, 30.0), (G, SERVER, today): (60.0, 30.0)}
        assert await db.slots() == {(G, 1): 1, (G, SERVER): 1}


async def test_sweep_recounts_drifted_slot_counters(db, storage):
    store = db.store()
    await admit(store, user_id=1)
    await admit(store, user_id=2)
    await db.sql("UPDATE quota_slots SET active = 50 WHERE user_id = 1")
    await db.sql("UPDATE quota_slots SET active = 0 WHERE user_id = :u", u=SERVER)
    await Sweeper(store, storage, RETENTION_S).sweep()
    assert await db.slots() == {(G, 1): 1, (G, 2): 1, (G, SERVER): 2}


# -- retention -------------------------------------------------------------------------------


async def test_retention_deletes_the_files_of_old_jobs_only(db, storage):
    store = db.store()
    now = utcnow()
    artifacts = {"files": {"vocals": "vocals.mp3", "drums": "drums.mp3"}}
    recent = await admit(store, input_sha256="abc")
    old = await admit(store, input_sha256="abc")  # the newer id: the cache's first pick
    old_failed = await admit(store)
    gone = await admit(store)
    deleted_at = now - timedelta(hours=5)
    for job, finished, state, extra in (
        (recent, now - timedelta(minutes=50), JobState.done, {"artifacts": artifacts}),
        (old, now - timedelta(hours=2), JobState.done, {"artifacts": artifacts}),
        (old_failed, now - timedelta(hours=2), JobState.failed, {}),
        (gone, now - timedelta(hours=6), JobState.done, {"artifacts": artifacts, "artifacts_deleted_at": deleted_at}),
    ):
        assert await store.transition(job.id, JobState.failed)  # settle the slot as a real ending would
        await store.update(job.id, state=state.value, finished_at=finished, **extra)
    for job in (recent, old, old_failed):
        job_files(storage, job.id, input_name="stems.txt")  # no input*: only retention at work
    probe = await admit(store, input_sha256="abc")
    assert (await store.find_cached(probe)).id == old.id

    report = await Sweeper(store, storage, RETENTION_S).sweep()
    assert sorted(report.expired) == sorted([old.id, old_failed.id])
    assert not storage.job_dir(old.id).exists() and not storage.job_dir(old_failed.id).exists()
    for job in (old, old_failed):
        marked = (await store.get(job.id)).artifacts_deleted_at
        assert marked is not None and abs(marked - utcnow()) < timedelta(seconds=30)
    # Within the retention time: kept, files and row alike.
    assert (storage.stems_dir(recent.id) / "vocals.mp3").is_file()
    assert (await store.get(recent.id)).artifacts_deleted_at is None
    # Already deleted: not again.
    assert (await store.get(gone.id)).artifacts_deleted_at == deleted_at
    # The cache no longer offers deleted results.
    assert (await store.find_cached(probe)).id == recent.id

    assert (await Sweeper(store, storage, RETENTION_S).sweep()).expired == []


# -- leftovers -------------------------------------------------------------------------------


async def test_leftovers_are_removed_and_work_in_progress_is_kept(db, storage):
    store = db.store()
    done = await admit(store)
    failed = await admit(store)
    cancelled = await admit(store)
    running = await admit(store)
    await store.update(running.id, state=JobState.separating.value)
    for job in (done, failed, cancelled):
        await store.update(job.id, state=JobState.fetching.value)
    assert await store.transition(failed.id, JobState.failed)
    assert await store.transition(cancelled.id, JobState.cancelled)
    await store.update(done.id, state=JobState.delivering.value)
    assert await store.transition(done.id, JobState.done)
    for job in (done, failed, cancelled, running):
        job_files(storage, job.id)

    # An encode that died long ago, and one under way.
    stale = storage.job_dir(running.id) / ".stems.partial-1a2b3c4d"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "vocals.mp3").write_bytes(b"x")
    age(stale, 2 * GRACE_S)
    fresh = storage.job_dir(running.id) / ".stems.partial-5e6f7a8b"
    fresh.mkdir()
    (fresh / "vocals.mp3").write_bytes(b"x")
    # Folders of jobs whose rows are gone: old ones go, young ones may still be in use.
    orphan_old, orphan_young = storage.job_dir(9001), storage.job_dir(9002)
    for orphan in (orphan_old, orphan_young):
        orphan.mkdir()
        (orphan / "input.wav").write_bytes(b"w")
    age(orphan_old, GRACE_S + 120)
    age(orphan_young, GRACE_S - 120)
    # Not job folders: left alone.
    other = storage.root / "cache"
    other.mkdir()
    age(other, 10 * GRACE_S)
    stray_file = storage.root / "123456"
    stray_file.write_bytes(b"not a folder")
    age(stray_file, 10 * GRACE_S)

    report = await Sweeper(store, storage, RETENTION_S).sweep()
    assert report.expired == [] and report.settled == []
    assert sorted(report.removed) == sorted(str(p) for p in (
        storage.job_dir(failed.id), storage.job_dir(cancelled.id), storage.job_dir(done.id) / "input.mp3",
        stale, orphan_old))

    assert not storage.job_dir(failed.id).exists() and not storage.job_dir(cancelled.id).exists()
    assert not (storage.job_dir(done.id) / "input.mp3").exists()
    assert sorted(p.name for p in storage.stems_dir(done.id).iterdir()) == ["drums.mp3", "vocals.mp3"]
    assert (storage.job_dir(running.id) / "input.mp3").is_file()  # still being worked on
    assert (storage.stems_dir(running.id) / "vocals.mp3").is_file()
    assert not stale.exists() and (fresh / "vocals.mp3").is_file()
    assert not orphan_old.exists() and (orphan_young / "input.wav").is_file()
    assert other.is_dir() and stray_file.is_file()

    # A second round finds nothing more to do.
    assert (await Sweeper(store, storage, RETENTION_S).sweep()).removed == []


async def test_run_survives_a_failed_round(db, storage, caplog):
    sweeper = Sweeper(db.store(), storage, RETENTION_S, interval_s=0.01)
    rounds = []
    real = sweeper.sweep

    async def flaky():
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("database went away")
        return await real()

    sweeper.sweep = flaky
    task = asyncio.create_task(sweeper.run())
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(rounds) >= 3:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(rounds) >= 3
    assert "sweeper round failed" in caplog.text


# -- jobs whose interaction was never answered --------------------------------------------


async def test_sweep_cancels_an_unanswered_job_marked_so_that_its_user_is_told(db, storage):
    store = db.store()
    lost = await admit(store, interaction_token="never-answered", token_expires_at=utcnow() + timedelta(minutes=15))
    answered = await admit(store, interaction_token="answered", token_expires_at=utcnow() + timedelta(minutes=15))
    await store.update(answered.id, status_message_id=42)
    await db.sql("UPDATE jobs SET created_at = :old", old=utcnow() - timedelta(seconds=UNATTACHED_AFTER_S + 60))

    await Sweeper(store, storage, RETENTION_S).sweep()

    swept = await store.get(lost.id)
    assert (swept.state, swept.error_kind, swept.slot_state) == ("cancelled", "unanswered", "released")
    assert swept.notified_at is None  # told by the bot (Dispatcher.ended), at its next start at the latest
    assert (await store.get(answered.id)).state == "queued"
    assert [job.id for job in await store.untold_endings(since=utcnow() - timedelta(days=1))] == [lost.id]
