"""The sweeper deletes the rows of jobs that ended longer ago than the job history, in
batches, keeping what quotas and challenges still need (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from core.challenges import ChallengeState, ChallengeStore
from core.db import utcnow
from core.jobs.job import InteractionToken, JobState
from core.jobs.quotas import utc_day
from core.jobs.sweeper import Sweeper
from core.storage.local import LocalStorage
from tests.support.quota_db import admit

DAY_S = 86400.0


async def ended(store, user: int, state: JobState, days_ago: float, files_deleted: bool = True, **fields) -> int:
    """A job of `user` that ended `days_ago` days ago, its minutes used or released."""
    job = await admit(store, user_id=user, interaction_token="tok", token_expires_at=utcnow())
    await store.update(job.id, state=JobState.fetching.value)
    await store.reserve(job.id, 60.0)
    if state is JobState.done:
        await store.update(job.id, state=JobState.delivering.value)
    assert await store.transition(job.id, state)
    finished = utcnow() - timedelta(days=days_ago)
    await store.update(job.id, finished_at=finished, artifacts_deleted_at=finished if files_deleted else None,
                       **fields)
    return job.id


async def tokens(db) -> int:
    async with db.sessions() as session:
        return await session.scalar(select(func.count()).select_from(InteractionToken)) or 0


async def test_old_rows_go_in_batches_and_what_is_still_needed_stays(db, tmp_path):
    store, challenges = db.store(), ChallengeStore(db.sessions)
    old = [await ended(store, user=k, state=state, days_ago=40)
           for k, state in enumerate([JobState.done, JobState.failed, JobState.cancelled, JobState.done,
                                      JobState.done])]
    recent = await ended(store, user=7, state=JobState.done, days_ago=3)
    files_kept = await ended(store, user=8, state=JobState.done, days_ago=40, files_deleted=False)
    waited_for = await ended(store, user=9, state=JobState.done, days_ago=40)
    deadline = utcnow() + timedelta(days=1)
    await challenges.create(guild_id=5, channel_id=1, host_id=1, title="t", submit_deadline=deadline,
                            vote_deadline=deadline, job_id=waited_for)  # still splitting: it reads the job
    await challenges.create(guild_id=5, channel_id=1, host_id=1, title="t", submit_deadline=deadline,
                            vote_deadline=deadline, job_id=old[0], state=ChallengeState.open.value)
    queued = await admit(store, user_id=10)
    await store.update(queued.id, created_at=utcnow() - timedelta(days=40))
    usage = await db.usage()
    assert any(used > 0 for (_, _, day), (used, _) in usage.items() if day == utc_day())  # charged
    assert await tokens(db) == 8  # one per ended job

    assert await store.delete_history(utcnow() - timedelta(days=30), batch=2) == len(old)  # three batches

    left = {job.id for job in await db.jobs()}
    assert left == {recent, files_kept, waited_for, queued.id}
    assert await tokens(db) == 3  # the deleted jobs' tokens went with them
    assert await db.usage() == usage  # the minutes used stay counted
    assert await store.delete_history(utcnow() - timedelta(days=30), batch=2) == 0


async def test_the_sweeper_deletes_rows_after_their_files(db, tmp_path):
    store = db.store()
    storage = LocalStorage(tmp_path / "files")
    expired = await ended(store, user=1, state=JobState.done, days_ago=40, files_deleted=False)
    stems = storage.stems_dir(expired)
    stems.mkdir(parents=True)
    (stems / "vocals.mp3").write_bytes(b"v")
    young = await ended(store, user=2, state=JobState.done, days_ago=10)
    sweeper = Sweeper(store, storage, retention_s=DAY_S, history_s=30 * DAY_S)

    report = await sweeper.sweep()

    assert report.expired == [expired] and not storage.job_dir(expired).exists()  # files first
    assert report.forgotten == 1
    assert {job.id for job in await db.jobs()} == {young}
    # A history shorter than the retention waits for the files: the row goes with them.
    short = Sweeper(store, storage, retention_s=20 * DAY_S, history_s=DAY_S)
    assert (await short.sweep()).forgotten == 0
    assert {job.id for job in await db.jobs()} == {young}
