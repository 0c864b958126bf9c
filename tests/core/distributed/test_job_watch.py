"""The distributed bot's watcher on a real PostgreSQL: one look reads the jobs handed to
workers, not the queue, and still notices every change another process makes."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from sqlalchemy import event

from core.db import make_engine, make_sessions
from core.distributed.fleet import Fleet
from core.distributed.queue_execution import QueueExecution
from core.jobs.dispatcher import Dispatcher, DispatcherConfig
from core.jobs.job import Job, JobState
from core.jobs.store import JobStore
from core.storage.local import LocalStorage
from tests.support.silent_notifier import Silent

QUEUED, RUNNING = 300, 3
FIELDS = dict(source_kind="attachment", source_url="https://cdn.invalid/x", source_name="a.wav", model="tiny",
              stems="all", format="mp3")


class Recording(Silent):
    def __init__(self):
        self.changed: list[tuple[int, str]] = []
        self.ended: list[int] = []

    async def job_changed(self, job):
        self.changed.append((job.id, job.state))

    async def job_ended(self, job):
        self.ended.append(job.id)


class Reads:
    """Statements and rows one stretch of code reads, counted on the engine: rows are the
    driver's count for each SELECT (-1 for a streamed read), Job objects the ORM built."""

    def __init__(self, engine):
        self.engine = engine.sync_engine
        self.statements: list[tuple[str, int]] = []
        self.jobs_loaded = 0
        event.listen(self.engine, "after_cursor_execute", self._executed)
        event.listen(Job, "load", self._loaded)

    def _executed(self, conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            self.statements.append((statement, cursor.rowcount))

    def _loaded(self, target, context):
        self.jobs_loaded += 1

    def reset(self):
        self.statements.clear()
        self.jobs_loaded = 0

    @property
    def rows(self) -> int:
        return sum(max(n, 0) for _, n in self.statements)

    def close(self):
        event.remove(self.engine, "after_cursor_execute", self._executed)
        event.remove(Job, "load", self._loaded)


@pytest_asyncio.fixture
async def bot(migrated, tmp_path):
    """A bot's dispatcher with its watcher (looks called by the test), 300 queued jobs and
    3 handed to workers, as the bot finds them at its start; a second store plays the
    other processes (workers, `stembot jobs`)."""
    engine = make_engine(migrated)
    sessions = make_sessions(engine)
    store, others = JobStore(sessions), JobStore(sessions)
    queued = [(await store.create(user_id=k, guild_id=k % 7, **FIELDS)).id for k in range(QUEUED)]
    running = []
    for k in range(RUNNING):
        job = await store.claim_next("bot")
        await store.update(job.id, queue_job_id=1000 + k)  # handed to the queue
        assert await others.take(job.id, f"w{k}/cpu") is not None
        running.append(job.id)
    notifier = Recording()
    execution = QueueExecution(None, Fleet(sessions))  # type: ignore[arg-type]  # no queue call in a look
    dispatcher = Dispatcher(store, LocalStorage(tmp_path / "jobs"), notifier, execution,
                            DispatcherConfig(worker_name="bot"))
    # What Dispatcher.start does before its loops (which would claim and look on their own).
    await execution.recover()
    for job in await store.unfinished():
        execution.resumed(job)
    reads = Reads(engine)
    yield execution, others, notifier, reads, [j for j in queued if j not in running], running
    reads.close()
    await dispatcher.stop()
    await engine.dispose()


async def test_a_look_reads_the_jobs_with_workers_not_the_queue(bot):
    execution, others, notifier, reads, queued, running = bot
    await execution._look()
    reads.reset()
    await execution._look()  # nothing changed
    assert reads.jobs_loaded == 0
    assert all(n >= 0 for _, n in reads.statements), "nothing streamed"
    # The handed-out jobs' narrow rows and one aggregate row of the queue, not its 297 rows.
    assert reads.rows <= RUNNING + 1, reads.statements
    assert len(reads.statements) <= 4

    # A worker writes progress: that one job's row is loaded, for the notifier.
    job, lease = await others.take(running[0], "w9/cpu")
    assert await others.update(job.id, lease=lease, progress=0.25)
    reads.reset()
    await execution._look()
    assert reads.jobs_loaded == 1
    assert reads.rows <= RUNNING + 2
    await asyncio.sleep(0.05)  # the notifier is told in the background
    assert notifier.changed[-1] == (running[0], "decoding")


async def test_a_look_notices_what_other_processes_do_to_the_queue(bot):
    execution, others, notifier, reads, queued, running = bot

    async def look():
        await execution._look()
        await asyncio.sleep(0.05)  # the notifier is told in the background

    await look()
    # An operator fails a queued job (`stembot jobs fail`): its user is told.
    assert await others.fail_by_operator(queued[5], "bad track")
    await look()
    assert notifier.ended == [queued[5]]
    # ... and retries it (`stembot jobs retry`): it shows as queued again.
    assert await others.retry(queued[5]) is JobState.failed
    await look()
    assert notifier.changed[-1] == (queued[5], "queued")
    # A worker's model host crashed: its job is back in the queue and shows it.
    job, lease = await others.take(running[1], "w9/cpu")
    assert await others.transition(job.id, JobState.queued, lease=lease)
    await look()
    assert notifier.changed[-1] == (running[1], "queued")
    # A worker fails a job: its user is told once.
    job, lease = await others.take(running[2], "w9/cpu")
    assert await others.transition(job.id, JobState.failed, lease=lease, error="boom", error_kind="x")
    await execution._look()
    await look()
    assert notifier.ended == [queued[5], running[2]]
    # A new admission shows too, found by its id, without reading the queue again.
    fresh = await others.create(user_id=1, guild_id=1, **FIELDS)
    queue_reads = execution._watch_rows.queue_reads
    await look()
    assert notifier.changed[-1] == (fresh.id, "queued")
    # The bot claims the next job: found among the handed-out ones, the queue not read again.
    claimed = await others.claim_next("bot")
    await look()
    assert (claimed.id, "fetching") in notifier.changed
    assert execution._watch_rows.queue_reads == queue_reads


async def test_an_end_the_database_kept_the_watcher_from_handling_is_reported_at_the_next_look(migrated, tmp_path):
    """A worker fails a job; the bot's look sees it leave the workers but cannot settle it
    (the quota table is away: renamed, for real): the end is kept and reported, settled,
    at the next look once the table is back."""
    from sqlalchemy import text

    from core.jobs.quotas import Policy, QuotaBook

    engine = make_engine(migrated)
    sessions = make_sessions(engine)
    policy = Policy(user_minutes_per_day=60, guild_minutes_per_day=600, user_concurrent_jobs=5,
                    guild_queued_jobs=20, max_track_minutes=20)
    store, worker = JobStore(sessions, QuotaBook(sessions, policy)), JobStore(sessions)
    job, _ = await store.admit(policy, user_id=5, guild_id=1, **FIELDS)
    assert (await store.claim_next("bot")).id == job.id
    await store.update(job.id, queue_job_id=1)
    _, lease = await worker.take(job.id, "w/cpu")
    notifier = Recording()
    execution = QueueExecution(None, Fleet(sessions))  # type: ignore[arg-type]  # no queue call here
    dispatcher = Dispatcher(store, LocalStorage(tmp_path / "jobs"), notifier, execution,
                            DispatcherConfig(worker_name="bot"))
    await execution.recover()
    for unfinished in await store.unfinished():
        execution.resumed(unfinished)
    try:
        await execution._look()
        assert await worker.transition(job.id, JobState.failed, lease=lease, error="boom", error_kind="x")
        async with engine.begin() as connection:
            await connection.execute(text("ALTER TABLE quota_slots RENAME TO quota_slots_away"))
        try:
            with pytest.raises(Exception, match="quota_slots"):
                await execution._look()
        finally:
            async with engine.begin() as connection:
                await connection.execute(text("ALTER TABLE quota_slots_away RENAME TO quota_slots"))
        assert notifier.ended == []
        await execution._look()
        assert notifier.ended == [job.id]
        assert (await store.get(job.id)).slot_state == "released"
    finally:
        await dispatcher.stop()
        await engine.dispose()
