"""The job row, its state machine, and the queries on it.

The row is the source of truth: who asked, where to reply, what was asked, how far it
got, and what came out. Every state change is one guarded, committed UPDATE (`WHERE
state IN (...)`), so two processes can never both move a job, and a restarted bot
finds every job where it was left.

    queued -> fetching -> decoding -> separating -> encoding -> delivering -> done
    any unfinished state -> failed | cancelled; a running state -> queued (retry)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    Float,
    Integer,
    String,
    Text,
    and_,
    case,
    false,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base, UTCDateTime, utcnow


class JobState(str, enum.Enum):
    queued = "queued"
    fetching = "fetching"
    decoding = "decoding"
    separating = "separating"
    encoding = "encoding"
    delivering = "delivering"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


RUNNING = (JobState.fetching, JobState.decoding, JobState.separating, JobState.encoding)
FINAL = (JobState.done, JobState.failed, JobState.cancelled)
UNFINISHED = (JobState.queued, *RUNNING, JobState.delivering)

# Which states each state may be entered from.
ALLOWED_FROM: dict[JobState, tuple[JobState, ...]] = {
    JobState.queued: RUNNING,
    JobState.fetching: (JobState.queued,),
    JobState.decoding: (JobState.fetching,),
    JobState.separating: (JobState.decoding,),
    JobState.encoding: (JobState.separating,),
    # From fetching directly when the results cache already has the stems.
    JobState.delivering: (JobState.encoding, JobState.fetching),
    JobState.done: (JobState.delivering,),
    JobState.failed: UNFINISHED,
    JobState.cancelled: (JobState.queued, *RUNNING),
}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Who asked, and where to answer.
    user_id: Mapped[int] = mapped_column(BigInteger, index=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    application_id: Mapped[int | None] = mapped_column(BigInteger)
    interaction_id: Mapped[int | None] = mapped_column(BigInteger)
    # A webhook token valid for 15 minutes: lets a restarted bot edit the reply.
    interaction_token: Mapped[str | None] = mapped_column(Text)
    token_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status_message_id: Mapped[int | None] = mapped_column(BigInteger)
    attachment_size_limit: Mapped[int] = mapped_column(BigInteger, default=10 * 1024 * 1024)

    # What was asked.
    source_kind: Mapped[str] = mapped_column(String(16))  # "attachment" or "url"
    source_url: Mapped[str] = mapped_column(Text)
    source_name: Mapped[str] = mapped_column(String(255))
    source_size: Mapped[int | None] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(64))
    stems: Mapped[str] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)  # lower runs first

    # How far it got.
    state: Mapped[str] = mapped_column(String(16), default=JobState.queued.value, index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Distributed mode: the queue's id for "run this job", and the presigned URLs a worker
    # reads the input from and writes the stems to (cleared when the job ends).
    queue_job_id: Mapped[int | None] = mapped_column(BigInteger)
    transfer: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(32))

    # Quota: the limits in force when it was asked for, its slot, and its reservation
    # (see core.quotas for the rules).
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    slot_state: Mapped[str] = mapped_column(String(16), default="none")  # none, held, released
    quota_state: Mapped[str] = mapped_column(String(16), default="none")  # none, reserved, charged, released
    reserved_s: Mapped[float] = mapped_column(Float, default=0.0)
    quota_day: Mapped[date | None] = mapped_column(Date)

    # What came out.
    input_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    artifacts_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
    separation_s: Mapped[float | None] = mapped_column(Float)
    artifacts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)

    @property
    def is_final(self) -> bool:
        return self.job_state in FINAL

    def token_usable(self, now: datetime | None = None, margin: timedelta = timedelta(seconds=60)) -> bool:
        """Whether the interaction token still has time to edit the reply or follow up."""
        if not self.interaction_token or self.token_expires_at is None:
            return False
        return (now or utcnow()) + margin < self.token_expires_at


@dataclass(frozen=True)
class Lease:
    """Which worker runs a job, and in which attempt. Every write of that run is fenced by
    it, so a worker presumed dead cannot move a job that another worker has taken over."""

    worker: str
    attempt: int

    def where(self):
        return and_(Job.worker == self.worker, Job.attempts == self.attempt)


@dataclass(frozen=True)
class QueueSnapshot:
    position: int | None  # 1-based among queued jobs, None when not queued
    length: int


@dataclass(frozen=True)
class QueuedJob:
    id: int
    priority: int
    created_at: datetime
    guild: int
    user: int


def fair_order(queued: list[QueuedJob], last_guild: dict[int, float], last_user: dict[tuple[int, int], float]
               ) -> list[int]:
    """The order in which queued jobs will run.

    Lower priority numbers first (interactive before bulk). Within a priority, the server
    served longest ago goes next; within that server, the user served longest ago; and
    of that user's jobs, the oldest. Serving a job makes its server and user the most
    recently served, so one user or one server flooding the queue takes turns with
    everyone else instead of going first. `last_*` map to the time each was last served.
    """
    remaining = sorted(queued, key=lambda j: (j.created_at, j.id))
    last_guild, last_user = dict(last_guild), dict(last_user)
    never = float("-inf")
    tick = max([*last_guild.values(), *last_user.values(), 0.0]) + 1.0
    order: list[int] = []
    while remaining:
        top = min(j.priority for j in remaining)
        candidates = [j for j in remaining if j.priority == top]
        # Candidates are oldest first, so ties go to whoever has waited longest.
        guild = min(candidates, key=lambda j: last_guild.get(j.guild, never)).guild
        in_guild = [j for j in candidates if j.guild == guild]
        job = min(in_guild, key=lambda j: last_user.get((j.guild, j.user), never))
        order.append(job.id)
        remaining.remove(job)
        last_guild[job.guild] = last_user[(job.guild, job.user)] = tick
        tick += 1.0
    return order


# A job asked for through an interaction may start only once its status message exists:
# until then there is nothing to show its progress or its end in.
_attached = or_(Job.interaction_token.is_(None), Job.status_message_id.is_not(None))


class JobStore:
    """Queries and guarded transitions on job rows. Every method commits.

    With a QuotaBook, jobs are admitted against their slots, reserve their minutes once
    their length is known, and settle both in the same transaction that ends the job.
    """

    def __init__(self, sessions: async_sessionmaker, quotas=None):
        self.sessions = sessions
        self.quotas = quotas

    async def create(self, **fields) -> Job:
        async with self.sessions() as session:
            job = Job(**fields)
            session.add(job)
            await session.commit()
            return job

    async def admit(self, policy, **fields) -> tuple[Job | None, str | None]:
        """Create a queued job if the user and the server have a free slot; else return
        the reason why not. Atomic: concurrent requests never exceed the limits."""
        if self.quotas is None:
            return await self.create(**fields), None
        async with self.sessions() as session:
            refusal = await self.quotas.take_slots(session, fields.get("guild_id") or 0, fields["user_id"], policy)
            if refusal is not None:
                await session.rollback()
                return None, refusal
            job = Job(**fields, slot_state="held", limits=policy.as_limits())
            session.add(job)
            await session.commit()
            return job, None

    async def reserve(self, job_id: int, seconds: float) -> None:
        """Reserve the job's audio minutes (once; a retried job keeps its reservation).
        Raises TooLongError or QuotaExceeded, reserving nothing."""
        from .audio import format_duration
        from .errors import TooLongError
        from .quotas import QuotaExceeded, utc_day

        if self.quotas is None:
            return
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
            # A job that already ended (e.g. cancelled during its download) reserves nothing:
            # it was settled when it ended, so nothing would release this reservation.
            if job is None or job.quota_state != "none" or not job.limits or job.is_final:
                return
            if seconds > job.limits["max_track_s"]:
                raise TooLongError(f"the track is {format_duration(seconds)} long; this server allows up to "
                                   f"{format_duration(job.limits['max_track_s'])}")
            day = utc_day()
            moved = await session.execute(
                update(Job).where(Job.id == job_id, Job.quota_state == "none",
                                  Job.state.in_([s.value for s in UNFINISHED])).values(
                    quota_state="reserved", reserved_s=seconds, quota_day=day))
            if moved.rowcount != 1:
                await session.rollback()
                return
            refusal = await self.quotas.reserve(session, job.guild_id or 0, job.user_id, seconds, job.limits, day)
            if refusal is not None:
                await session.rollback()
                raise QuotaExceeded(refusal)
            await session.commit()

    async def _settle(self, session, job_id: int) -> None:
        """Inside a transaction that just ended the job: charge or release its minutes and
        free its slot, each at most once."""
        if self.quotas is None:
            return
        job = await session.get(Job, job_id, populate_existing=True)
        if job is None or not job.is_final:
            return
        guild = job.guild_id or 0
        if job.quota_state == "reserved":
            charge = job.job_state is JobState.done and not job.cache_hit
            moved = await session.execute(update(Job).where(Job.id == job_id, Job.quota_state == "reserved")
                                          .values(quota_state="charged" if charge else "released"))
            if moved.rowcount == 1:
                await self.quotas.settle(session, guild, job.user_id, job.reserved_s, job.quota_day, charge)
        if job.slot_state == "held":
            moved = await session.execute(update(Job).where(Job.id == job_id, Job.slot_state == "held")
                                          .values(slot_state="released"))
            if moved.rowcount == 1:
                await self.quotas.release_slots(session, guild, job.user_id)

    async def cancel_unattached(self, before: datetime) -> list[int]:
        """Sweeper: cancel queued jobs whose status message never came (the reply to the
        interaction failed), so they release their slot instead of waiting for ever."""
        async with self.sessions() as session:
            ids = list(await session.scalars(select(Job.id).where(
                Job.state == JobState.queued.value, ~_attached, Job.created_at < before)))
        return [i for i in ids if await self.transition(i, JobState.cancelled, error="the reply to Discord failed",
                                                        error_kind="cancelled")]

    async def settle_finished(self) -> list[int]:
        """Sweeper: settle finished jobs that still hold a slot or a reservation."""
        async with self.sessions() as session:
            ids = list(await session.scalars(select(Job.id).where(
                Job.state.in_([s.value for s in FINAL]),
                or_(Job.quota_state == "reserved", Job.slot_state == "held"))))
            for job_id in ids:
                # One transaction per job: it then locks counters in the same order as an
                # admission (the user's, then the server's), so the two cannot deadlock.
                await self._settle(session, job_id)
                await session.commit()
            return ids

    async def get(self, job_id: int) -> Job | None:
        async with self.sessions() as session:
            return await session.get(Job, job_id)

    async def update(self, job_id: int, lease: Lease | None = None, in_state: JobState | None = None,
                     **fields) -> bool:
        """Set fields without changing the state (progress, message ids, artifacts). With a
        lease (and `in_state`), only while that run still holds the job (in that state).
        Returns whether the row was written."""
        condition = Job.id == job_id
        if lease is not None:
            condition = and_(condition, lease.where())
        if in_state is not None:
            condition = and_(condition, Job.state == in_state.value)
        async with self.sessions() as session:
            result = await session.execute(update(Job).where(condition).values(updated_at=utcnow(), **fields))
            await session.commit()
            return result.rowcount == 1

    async def transition(self, job_id: int, to: JobState, lease: Lease | None = None, **fields) -> bool:
        """Move the job to `to` if its current state allows it (and, with a lease, that run
        still holds it). Returns whether it moved. Ending a job settles its quota in the
        same transaction."""
        values: dict[str, Any] = {"state": to.value, "updated_at": utcnow(), **fields}
        if to in FINAL:
            values.setdefault("finished_at", utcnow())
            values.setdefault("transfer", None)  # presigned URLs are of no use any more
        if to in RUNNING:
            values.setdefault("progress", 0.0)
        allowed = [s.value for s in ALLOWED_FROM[to]]
        condition = and_(Job.id == job_id, Job.state.in_(allowed))
        if lease is not None:
            condition = and_(condition, lease.where())
        async with self.sessions() as session:
            result = await session.execute(update(Job).where(condition).values(**values))
            moved = result.rowcount == 1
            if moved and to in FINAL:
                await self._settle(session, job_id)
            await session.commit()
            return moved

    async def _queued(self, session) -> tuple[list[QueuedJob], dict, dict]:
        rows = (await session.execute(
            select(Job.id, Job.priority, Job.created_at, Job.guild_id, Job.user_id)
            .where(Job.state == JobState.queued.value, _attached)
            .order_by(Job.created_at, Job.id).limit(2000)
        )).all()
        queued = [QueuedJob(r.id, r.priority, r.created_at, r.guild_id or 0, r.user_id) for r in rows]
        if not queued:
            return [], {}, {}
        since = utcnow() - timedelta(days=1)
        guild = func.coalesce(Job.guild_id, 0)
        served = (await session.execute(
            select(guild, Job.user_id, func.max(Job.started_at))
            .where(Job.started_at.is_not(None), Job.started_at > since,
                   guild.in_({j.guild for j in queued})).group_by(guild, Job.user_id)
        )).all()
        last_user = {(g, u): _timestamp(t) for g, u, t in served}
        last_guild: dict[int, float] = {}
        for (g, _), t in last_user.items():
            last_guild[g] = max(last_guild.get(g, t), t)
        return queued, last_guild, last_user

    async def claim_next(self, worker: str) -> Job | None:
        """Take the next queued job in fair order (see `fair_order`) for `worker`, atomically."""
        async with self.sessions() as session:
            while True:
                queued, last_guild, last_user = await self._queued(session)
                if not queued:
                    return None
                candidate = fair_order(queued, last_guild, last_user)[0]
                now = utcnow()
                result = await session.execute(
                    update(Job).where(Job.id == candidate, Job.state == JobState.queued.value).values(
                        state=JobState.fetching.value, worker=worker, started_at=now, updated_at=now,
                        heartbeat_at=now, attempts=Job.attempts + 1, progress=0.0,
                    )
                )
                await session.commit()
                if result.rowcount == 1:
                    return await session.get(Job, candidate, populate_existing=True)

    async def take(self, job_id: int, worker: str) -> tuple[Job, Lease] | None:
        """A worker starts a job (fetching -> decoding), or takes over one whose worker
        died (a running state -> decoding, one more attempt). None when the job is not
        there to run (cancelled, finished, back in the queue)."""
        now = utcnow()
        running = [s.value for s in RUNNING]
        async with self.sessions() as session:
            attempt = await session.scalar(
                update(Job).where(Job.id == job_id, Job.state.in_(running)).values(
                    attempts=case((Job.state == JobState.fetching.value, Job.attempts), else_=Job.attempts + 1),
                    state=JobState.decoding.value, worker=worker, heartbeat_at=now, updated_at=now, progress=0.0,
                ).returning(Job.attempts))
            await session.commit()
            if attempt is None:
                return None
            return await session.get(Job, job_id, populate_existing=True), Lease(worker, attempt)

    async def request_cancel(self, job_id: int) -> JobState | None:
        """Cancel a queued or running job (a running one stops at its worker's next
        segment). Returns the new state, or None when it was already too late."""
        if await self.transition(job_id, JobState.cancelled, error="cancelled", error_kind="cancelled"):
            return JobState.cancelled
        return None

    async def queue_snapshot(self, job_id: int) -> QueueSnapshot:
        async with self.sessions() as session:
            queued, last_guild, last_user = await self._queued(session)
        order = fair_order(queued, last_guild, last_user)
        position = order.index(job_id) + 1 if job_id in order else None
        return QueueSnapshot(position, len(order))

    async def queue_length(self) -> int:
        async with self.sessions() as session:
            return await session.scalar(
                select(func.count()).select_from(Job).where(Job.state == JobState.queued.value)
            ) or 0

    async def find_cached(self, job: Job) -> Job | None:
        """A delivered job with the same audio (content hash), model, stems and format
        whose files are still kept."""
        if not job.input_sha256:
            return None
        async with self.sessions() as session:
            return await session.scalar(
                select(Job).where(
                    Job.input_sha256 == job.input_sha256, Job.model == job.model, Job.stems == job.stems,
                    Job.format == job.format, Job.state == JobState.done.value, Job.id != job.id,
                    Job.artifacts_deleted_at.is_(None), Job.artifacts.is_not(None),
                ).order_by(Job.id.desc()).limit(1))

    async def finished_before(self, moment: datetime, user_id: int | None = None) -> list[Job]:
        """Finished jobs whose files are still kept, finished before `moment`."""
        async with self.sessions() as session:
            condition = and_(Job.state.in_([s.value for s in FINAL]), Job.artifacts_deleted_at.is_(None),
                             Job.finished_at < moment)
            if user_id is not None:
                condition = and_(condition, Job.user_id == user_id)
            return list(await session.scalars(select(Job).where(condition)))

    async def reconcile_slots(self) -> None:
        """Sweeper: recount every slot counter from the jobs that hold one, so a counter
        can never drift for good (e.g. after a crash between two writes)."""
        if self.quotas is None:
            return
        from .quotas import SERVER, QuotaSlot

        async with self.sessions() as session:
            # Lock the counters first: an admission under way either finishes before the
            # count (and is counted) or waits until the new counts are written.
            if (await session.connection()).dialect.name == "sqlite":
                # SQLite ignores FOR UPDATE, and its reads take no lock: take the database's
                # write lock with an UPDATE that changes nothing, before counting.
                await session.execute(update(QuotaSlot).where(false()).values(active=QuotaSlot.active))
            # In the order admissions and endings lock them (a user's, then the server's),
            # or PostgreSQL may find a deadlock and abort one of them.
            slots = list(await session.scalars(
                select(QuotaSlot).order_by(QuotaSlot.guild_id, QuotaSlot.user_id.desc()).with_for_update()))
            guild = func.coalesce(Job.guild_id, 0)
            held = (await session.execute(
                select(guild, Job.user_id, func.count()).where(Job.slot_state == "held").group_by(guild, Job.user_id)
            )).all()
            counts: dict[tuple[int, int], int] = {}
            for g, u, n in held:
                counts[(g, u)] = n
                counts[(g, SERVER)] = counts.get((g, SERVER), 0) + n
            for slot in slots:
                slot.active = counts.pop((slot.guild_id, slot.user_id), 0)
            for (g, u), n in counts.items():
                session.add(QuotaSlot(guild_id=g, user_id=u, active=n))
            await session.commit()

    async def for_user(self, user_id: int, states: Iterable[JobState] = UNFINISHED, limit: int = 10) -> list[Job]:
        async with self.sessions() as session:
            rows = await session.scalars(
                select(Job).where(Job.user_id == user_id, Job.state.in_([s.value for s in states]))
                .order_by(Job.id.desc()).limit(limit)
            )
            return list(rows)

    async def unfinished(self) -> list[Job]:
        async with self.sessions() as session:
            rows = await session.scalars(
                select(Job).where(Job.state.in_([s.value for s in UNFINISHED])).order_by(Job.id)
            )
            return list(rows)

    async def requeue_running(self, worker: str | None = None) -> list[int]:
        """Put jobs that were running (on `worker`, or anywhere) back in the queue, e.g.
        after the process running them died. Their attempt count is kept."""
        async with self.sessions() as session:
            condition = Job.state.in_([s.value for s in RUNNING])
            if worker is not None:
                condition = and_(condition, Job.worker == worker)
            ids = list(await session.scalars(select(Job.id).where(condition)))
            if ids:
                await session.execute(
                    update(Job).where(Job.id.in_(ids), condition).values(
                        state=JobState.queued.value, worker=None, progress=0.0, updated_at=utcnow()
                    )
                )
                await session.commit()
            return ids

    async def requeue_preparing(self) -> list[int]:
        """Distributed mode, at the bot's start: jobs the bot was still preparing (fetching,
        not yet handed to the queue) go back to the queue. Jobs with a worker stay theirs."""
        async with self.sessions() as session:
            condition = and_(Job.state == JobState.fetching.value, Job.queue_job_id.is_(None))
            ids = list(await session.scalars(select(Job.id).where(condition)))
            if ids:
                await session.execute(update(Job).where(Job.id.in_(ids), condition).values(
                    state=JobState.queued.value, worker=None, progress=0.0, updated_at=utcnow()))
                await session.commit()
            return ids

    async def counts_by_state(self) -> dict[str, int]:
        async with self.sessions() as session:
            rows = await session.execute(select(Job.state, func.count()).group_by(Job.state))
            return {state: count for state, count in rows}


def _timestamp(moment) -> float:
    if moment.tzinfo is None:  # SQLite drops the zone; stored values are UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()
