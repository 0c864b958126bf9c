"""What the distributed bot's watcher reads of the job rows: only what can change without
the bot knowing, so that one look costs in proportion to the jobs handed to workers, not
to the queue.

Workers change only the jobs handed to them (a running state, or `delivering`), so those
rows are read in full on every look, as a few narrow columns. Of the queued jobs only the
set of their ids matters (one left the queue, or came back); the watcher keeps that set in
memory and checks it against one aggregate row (count and sum of the ids) plus the ids
above the highest it knows (new admissions). Only a change it cannot explain (an operator's
`stembot jobs fail` of a queued job, a cancel, a commit out of id order) makes it read the
queued ids again. On PostgreSQL a look's queries read one snapshot (repeatable read), so
the changes they show add up.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.jobs.job import RUNNING, Job, JobState

# The states of the jobs handed to workers: what a worker may change.
HANDED_OUT = tuple(s.value for s in (*RUNNING, JobState.delivering))
_QUEUED = JobState.queued.value

# Queued ids read per step when the set must be read again: the loop runs between steps.
_PARTITION = 1000


@dataclass(frozen=True)
class HandedOut:
    """The columns of a handed-out job that the watcher compares or acts on."""

    id: int
    state: str
    progress: float | None
    quota_state: str
    duration_s: float | None
    limits: dict[str, Any] | None
    cache_hit: bool
    queue_job_id: int | None

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)


_HANDED_OUT_COLUMNS = (Job.id, Job.state, Job.progress, Job.quota_state, Job.duration_s, Job.limits, Job.cache_hit,
                       Job.queue_job_id)


@dataclass
class Look:
    """What one look found."""

    handed_out: list[HandedOut] = field(default_factory=list)
    # Jobs handed out at the previous look but not now, with their state now (None: no row).
    left: dict[int, str | None] = field(default_factory=dict)
    # Queued jobs that left the queue other than to a worker (ended, or no row), and jobs
    # that came into it (admitted, or back from a worker or from an operator's retry).
    dequeued: set[int] = field(default_factory=set)
    enqueued: set[int] = field(default_factory=set)
    claimed: set[int] = field(default_factory=set)  # known queued before, handed out now
    queue_read: bool = False  # whether the queued ids had to be read again


class JobWatch:
    """The watcher's memory of the job rows between looks, and the queries of one look."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]):
        self.sessions = sessions
        self.handed_out: set[int] = set()
        self.queued: set[int] = set()
        self._queued_sum = 0
        self._highest = 0  # the highest job id seen queued or handed out
        self.synced = False  # whether the queued set was ever read, or given at start
        self.queue_reads = 0  # how often the queued ids were read (for tests and benchmarks)

    def starting(self) -> None:
        """The bot starts: the jobs it finds follow (`know`); what comes later is news."""
        self.synced = True

    def know(self, job_id: int, state: JobState) -> None:
        """Start from a job known at start (`QueueExecution.resumed`)."""
        if state is JobState.queued:
            self._enqueue(job_id)
        elif state.value in HANDED_OUT:
            self.handed_out.add(job_id)
        self._highest = max(self._highest, job_id)

    def _enqueue(self, job_id: int) -> None:
        if job_id not in self.queued:
            self.queued.add(job_id)
            self._queued_sum += job_id

    def _dequeue(self, job_id: int) -> None:
        if job_id in self.queued:
            self.queued.discard(job_id)
            self._queued_sum -= job_id

    async def look(self) -> Look:
        """Read what changed since the last look; the watch's memory moves to now."""
        found = Look()
        async with self.sessions() as session:
            if session.bind is not None and session.bind.dialect.name == "postgresql":
                await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            rows = (await session.execute(select(*_HANDED_OUT_COLUMNS).where(Job.state.in_(HANDED_OUT)))).all()
            found.handed_out = [HandedOut(*row) for row in rows]
            now_out = {job.id for job in found.handed_out}
            gone = self.handed_out - now_out
            if gone:
                found.left = dict.fromkeys(gone)
                found.left.update((await session.execute(select(Job.id, Job.state).where(Job.id.in_(gone)))).all())
            admitted: list[int] = []
            if self.synced:  # by the primary key: the few admitted since the last look
                admitted = list(await session.scalars(
                    select(Job.id).where(Job.id > self._highest, Job.state == _QUEUED).order_by(Job.id)))
            count, total = (await session.execute(
                select(func.count(), func.coalesce(func.sum(Job.id), 0)).where(Job.state == _QUEUED))).one()
            # What the queue should hold if nothing else happened: the known set, less the
            # jobs now with a worker, plus the jobs back from one and the new ones.
            for job_id in now_out:
                if job_id in self.queued:
                    found.claimed.add(job_id)
                    self._dequeue(job_id)
            for job_id, state in found.left.items():
                if state == _QUEUED:
                    found.enqueued.add(job_id)
                    self._enqueue(job_id)
            for job_id in admitted:
                if job_id not in self.queued:
                    found.enqueued.add(job_id)
                    self._enqueue(job_id)
            if not self.synced or (len(self.queued), self._queued_sum) != (count, int(total)):
                found.queue_read = True
                self.queue_reads += 1
                now_queued = await _queued_ids(session)
                found.dequeued = self.queued - now_queued
                found.enqueued |= now_queued - self.queued
                if not self.synced:  # a first read: nothing came or went, the queue is learnt
                    found.dequeued.clear()
                    found.enqueued.clear()
                self.queued, self._queued_sum = now_queued, sum(now_queued)
                self._highest = max(self._highest, max(now_queued, default=0))
                self.synced = True
        self.handed_out = now_out
        self._highest = max(self._highest, max(now_out, default=0), max(admitted, default=0))
        return found

    async def full_rows(self, ids: Collection[int]) -> list[Job]:
        """The whole rows of the jobs whose change the notifier is told (few: changed ones)."""
        if not ids:
            return []
        async with self.sessions() as session:
            return list(await session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)))


async def _queued_ids(session: AsyncSession) -> set[int]:
    ids: set[int] = set()
    result = await session.stream_scalars(
        select(Job.id).where(Job.state == _QUEUED).execution_options(yield_per=_PARTITION))
    async for partition in result.partitions():
        ids.update(partition)
    return ids
