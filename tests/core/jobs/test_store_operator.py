"""The operator's actions on the job store (`stembot jobs`), on SQLite and PostgreSQL:
retry and fail keep the quota counters exact and fence off a run still under way."""

from __future__ import annotations

import pytest_asyncio
from sqlalchemy import select

from core.db import make_engine, make_sessions
from core.jobs.job import JobState
from core.jobs.quotas import Policy, QuotaBook, QuotaSlot, QuotaUsage
from core.jobs.store import JobStore

FIELDS = dict(source_kind="attachment", source_url="https://cdn.example/a.mp3", source_name="a.mp3",
              model="tiny", stems="all", format="mp3")
POLICY = Policy(user_minutes_per_day=60, guild_minutes_per_day=600, user_concurrent_jobs=1,
                guild_queued_jobs=20, max_track_minutes=20)
GUILD, USER = 3, 9


@pytest_asyncio.fixture
async def store(database_url):
    engine = make_engine(database_url)
    sessions = make_sessions(engine)
    yield JobStore(sessions, QuotaBook(sessions, POLICY))
    await engine.dispose()


async def admitted(store: JobStore, user_id: int = USER):
    job, refusal = await store.admit(POLICY, **FIELDS, user_id=user_id, guild_id=GUILD)
    assert refusal is None
    return job


async def slots(store: JobStore) -> dict[tuple[int, int], int]:
    async with store.sessions() as session:
        return {(s.guild_id, s.user_id): s.active for s in await session.scalars(select(QuotaSlot))}


async def reserved(store: JobStore) -> dict[tuple[int, int], tuple[float, float]]:
    async with store.sessions() as session:
        return {(u.guild_id, u.user_id): (u.used_s, u.reserved_s) for u in await session.scalars(select(QuotaUsage))}


async def test_retry_of_a_running_job_keeps_its_quota_and_fences_off_the_old_run(store):
    job = await admitted(store)
    await store.claim_next("bot")
    await store.reserve(job.id, 30.0)
    _, lease = await store.take(job.id, "w1/cpu")
    await store.transition(job.id, JobState.separating, lease=lease)

    assert await store.retry(job.id) is JobState.separating
    retried = await store.get(job.id)
    assert (retried.job_state, retried.worker, retried.attempts) == (JobState.queued, None, 1)
    assert (retried.slot_state, retried.quota_state, retried.reserved_s) == ("held", "reserved", 30.0)
    assert await slots(store) == {(GUILD, USER): 1, (GUILD, 0): 1}
    assert await reserved(store) == {(GUILD, USER): (0.0, 30.0), (GUILD, 0): (0.0, 30.0)}

    # The old run can write nothing of the job, now or after the next claim by its worker's name.
    assert not await store.update(job.id, lease=lease, progress=0.9)
    assert not await store.transition(job.id, JobState.failed, lease=lease, error="late", error_kind="error")
    again = await store.claim_next("w1/cpu")
    assert again.id == job.id and again.attempts == 2
    assert not await store.transition(job.id, JobState.delivering, lease=lease)
    assert (await store.get(job.id)).job_state is JobState.fetching


async def test_retry_of_a_failed_job_takes_its_slot_again_and_reserves_anew(store):
    job = await admitted(store)
    await store.claim_next("bot")
    await store.reserve(job.id, 30.0)
    assert await store.transition(job.id, JobState.failed, error="boom", error_kind="error")
    assert await slots(store) == {(GUILD, USER): 0, (GUILD, 0): 0}

    assert await store.retry(job.id) is JobState.failed
    retried = await store.get(job.id)
    assert (retried.job_state, retried.error, retried.finished_at) == (JobState.queued, None, None)
    assert (retried.slot_state, retried.quota_state, retried.reserved_s) == ("held", "none", 0.0)
    assert await slots(store) == {(GUILD, USER): 1, (GUILD, 0): 1}
    assert (await store.admit(POLICY, **FIELDS, user_id=USER, guild_id=GUILD))[0] is None  # its slot counts
    await store.reconcile_slots()
    assert await slots(store) == {(GUILD, USER): 1, (GUILD, 0): 1}  # the counters agree with the rows

    await store.claim_next("bot")
    await store.reserve(job.id, 20.0)  # reserved anew
    assert await reserved(store) == {(GUILD, USER): (0.0, 20.0), (GUILD, 0): (0.0, 20.0)}
    assert await store.fail_by_operator(job.id, "stopped by the operator")
    assert await slots(store) == {(GUILD, USER): 0, (GUILD, 0): 0}
    assert await reserved(store) == {(GUILD, USER): (0.0, 0.0), (GUILD, 0): (0.0, 0.0)}


async def test_retry_of_a_failed_job_not_yet_settled_keeps_what_it_holds(store):
    """A worker failed it and the bot has not settled it yet: it still holds its slot and
    reservation, so the retry takes nothing more."""
    job = await admitted(store)
    worker = JobStore(store.sessions)  # a worker's store: no QuotaBook
    await store.claim_next("bot")
    await store.reserve(job.id, 30.0)
    _, lease = await worker.take(job.id, "w/cpu")
    assert await worker.transition(job.id, JobState.failed, lease=lease, error="boom", error_kind="error")

    assert await store.retry(job.id) is JobState.failed
    retried = await store.get(job.id)
    assert (retried.slot_state, retried.quota_state) == ("held", "reserved")
    assert await slots(store) == {(GUILD, USER): 1, (GUILD, 0): 1}
    assert await store.settle_finished() == []  # unfinished again: nothing to settle


async def test_retry_refuses_other_states_and_unknown_jobs(store):
    queued = await admitted(store)
    assert await store.retry(queued.id) is None
    assert await store.retry(queued.id + 100) is None
    assert await store.transition(queued.id, JobState.cancelled, error="cancelled", error_kind="cancelled")
    assert await store.retry(queued.id) is None
    assert (await store.get(queued.id)).job_state is JobState.cancelled
    assert await slots(store) == {(GUILD, USER): 0, (GUILD, 0): 0}


async def test_fail_releases_the_slot_and_reservation_once_and_fences_off_the_run(store):
    job = await admitted(store)
    await store.claim_next("bot")
    await store.reserve(job.id, 30.0)
    await store.update(job.id, transfer={"input_url": "https://s3.example/x?X-Amz-Signature=secret"})
    _, lease = await store.take(job.id, "w1/cpu")

    assert await store.fail_by_operator(job.id, "stopped by the operator")
    failed = await store.get(job.id)
    assert (failed.job_state, failed.error, failed.error_kind) == (JobState.failed, "stopped by the operator",
                                                                   "operator")
    assert (failed.slot_state, failed.quota_state, failed.transfer, failed.worker) == ("released", "released",
                                                                                        None, None)
    assert await slots(store) == {(GUILD, USER): 0, (GUILD, 0): 0}
    assert await reserved(store) == {(GUILD, USER): (0.0, 0.0), (GUILD, 0): (0.0, 0.0)}
    assert not await store.update(job.id, lease=lease, progress=0.5)

    assert not await store.fail_by_operator(job.id, "again")  # finished: once only
    assert await store.settle_finished() == []
    assert await slots(store) == {(GUILD, USER): 0, (GUILD, 0): 0}
    assert (await store.get(job.id)).error == "stopped by the operator"


async def test_latest_is_newest_first_with_a_state_and_a_limit(store):
    jobs = [await admitted(store, user_id=u) for u in (1, 2, 3)]
    assert await store.fail_by_operator(jobs[1].id, "x")
    assert [j.id for j in await store.latest()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in await store.latest(limit=2)] == [jobs[2].id, jobs[1].id]
    assert [j.id for j in await store.latest(JobState.failed)] == [jobs[1].id]
    assert await store.latest(JobState.done) == []
