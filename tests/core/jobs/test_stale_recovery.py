"""The sweeper takes back running jobs whose heartbeat went stale (JobStore.recover_stale),
on real SQLite and PostgreSQL. Times are driven by writing old heartbeat_at values."""

from __future__ import annotations

from datetime import timedelta

import pytest

from core.db import utcnow
from core.jobs.job import JobState
from core.jobs.quotas import SERVER, utc_day
from core.jobs.store import STALLED, Recovered
from core.jobs.sweeper import Sweeper
from core.storage.local import LocalStorage
from tests.support.quota_db import admit

G = 5
STALE_S = 60.0
LONG_AGO = timedelta(seconds=10 * STALE_S)


@pytest.fixture
def told():
    """What the sweeper told (Dispatcher.recovered in the bot)."""
    return []


@pytest.fixture
def sweeper(db, tmp_path, told):
    async def on_recovered(jobs: list[Recovered]) -> None:
        told.extend(jobs)

    return Sweeper(db.store(), LocalStorage(tmp_path / "files"), 3600.0, stale_s=STALE_S, max_attempts=2,
                   on_recovered=on_recovered)


async def running(store, worker: str, user_id: int = 1):
    """A job claimed by the bot and taken by `worker` (decoding, attempt 1)."""
    await admit(store, user_id=user_id)
    claimed = await store.claim_next("bot")
    taken = await store.take(claimed.id, worker)
    assert taken is not None
    return taken


async def test_a_stale_run_goes_back_to_the_queue_and_can_no_longer_write(db, sweeper, told):
    store = sweeper.store
    job, lease = await running(store, "w1")
    await store.reserve(job.id, 60.0)
    fresh, _ = await running(store, "w2", user_id=2)
    await store.update(job.id, heartbeat_at=utcnow() - LONG_AGO)

    assert await sweeper.recover_stale() == [Recovered(job.id, JobState.queued, None)]
    assert told == [Recovered(job.id, JobState.queued, None)]
    row = await store.require(job.id)
    assert (row.job_state, row.worker, row.attempts) == (JobState.queued, None, 1)
    assert row.slot_state == "held" and row.quota_state == "reserved"  # kept for the next run
    assert (await store.require(fresh.id)).job_state is JobState.decoding  # its heartbeat is fresh
    # The old run, should it come back, finds its lease gone: it cannot finish the job.
    assert not await store.update(job.id, lease=lease, progress=0.5)
    assert not await store.transition(job.id, JobState.encoding, lease=lease)
    # The next run counts one more attempt.
    again = await store.claim_next("bot")
    assert again is not None and again.id == job.id and again.attempts == 2
    assert await sweeper.recover_stale() == []  # claimed just now: its heartbeat is fresh


async def test_a_stale_run_out_of_attempts_fails_uncharged_and_is_told(db, sweeper, told):
    store = sweeper.store
    job, _ = await running(store, "w1")
    await store.reserve(job.id, 90.0)
    await store.update(job.id, heartbeat_at=utcnow() - LONG_AGO, attempts=2)

    assert await sweeper.recover_stale() == [Recovered(job.id, JobState.failed, None)]
    assert told == [Recovered(job.id, JobState.failed, None)]
    row = await store.require(job.id)
    assert (row.job_state, row.error, row.error_kind) == (JobState.failed, STALLED, "stalled")
    assert (row.slot_state, row.quota_state) == ("released", "released")
    assert (await db.usage())[(G, 1, utc_day())] == (0.0, 0.0)  # nobody charged
    assert (await db.slots())[(G, SERVER)] == 0


async def test_a_preparation_cut_short_is_taken_back_but_a_job_waiting_for_a_worker_is_not(db, sweeper):
    store = sweeper.store
    cut_short = await admit(store, user_id=1)
    waiting = await admit(store, user_id=2)
    for _ in range(2):
        await store.claim_next("bot")
    # Handed to the queue: it waits in `fetching` for a free worker, however long.
    await store.update(waiting.id, queue_job_id=77)
    for job in (cut_short, waiting):
        await store.update(job.id, heartbeat_at=utcnow() - LONG_AGO)

    assert [r.job_id for r in await sweeper.recover_stale()] == [cut_short.id]
    assert (await store.require(cut_short.id)).job_state is JobState.queued
    assert (await store.require(waiting.id)).job_state is JobState.fetching


async def test_a_heartbeat_just_in_time_keeps_the_job(db, sweeper):
    store = sweeper.store
    job, lease = await running(store, "w1")
    await store.update(job.id, heartbeat_at=utcnow() - LONG_AGO)
    assert await store.update(job.id, lease=lease, heartbeat_at=utcnow())  # the run beats again
    assert await sweeper.recover_stale() == []
    assert (await store.require(job.id)).job_state is JobState.decoding


async def test_the_queue_job_of_a_stale_run_is_named_for_withdrawal(db, sweeper):
    store = sweeper.store
    job, _ = await running(store, "w1")
    await store.update(job.id, queue_job_id=42, heartbeat_at=utcnow() - LONG_AGO)
    assert await sweeper.recover_stale() == [Recovered(job.id, JobState.queued, 42)]
    assert (await store.require(job.id)).queue_job_id is None  # the next hand-over queues anew
