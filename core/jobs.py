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
from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    Text,
    and_,
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
    JobState.delivering: (JobState.encoding,),
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
    error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(32))

    # What came out.
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
class QueueSnapshot:
    position: int | None  # 1-based among queued jobs, None when not queued
    length: int


class JobStore:
    """Queries and guarded transitions on job rows. Every method commits."""

    def __init__(self, sessions: async_sessionmaker):
        self.sessions = sessions

    async def create(self, **fields) -> Job:
        async with self.sessions() as session:
            job = Job(**fields)
            session.add(job)
            await session.commit()
            return job

    async def get(self, job_id: int) -> Job | None:
        async with self.sessions() as session:
            return await session.get(Job, job_id)

    async def update(self, job_id: int, **fields) -> None:
        """Set fields without changing the state (progress, message ids, artifacts)."""
        async with self.sessions() as session:
            await session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow(), **fields))
            await session.commit()

    async def transition(self, job_id: int, to: JobState, **fields) -> bool:
        """Move the job to `to` if its current state allows it. Returns whether it moved."""
        values: dict[str, Any] = {"state": to.value, "updated_at": utcnow(), **fields}
        if to in FINAL:
            values.setdefault("finished_at", utcnow())
        if to in RUNNING:
            values.setdefault("progress", 0.0)
        allowed = [s.value for s in ALLOWED_FROM[to]]
        async with self.sessions() as session:
            result = await session.execute(
                update(Job).where(Job.id == job_id, Job.state.in_(allowed)).values(**values)
            )
            await session.commit()
            return result.rowcount == 1

    async def claim_next(self, worker: str) -> Job | None:
        """Take the first queued job (priority, then age) for `worker`, atomically."""
        async with self.sessions() as session:
            while True:
                candidate = await session.scalar(
                    select(Job.id).where(Job.state == JobState.queued.value)
                    .order_by(Job.priority, Job.created_at, Job.id).limit(1)
                )
                if candidate is None:
                    return None
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

    async def request_cancel(self, job_id: int) -> JobState | None:
        """Cancel a queued job at once; flag a running one for its worker. Returns the
        state the job is then in, or None when it was already finished or delivering."""
        if await self.transition(job_id, JobState.cancelled, error="cancelled", error_kind="cancelled"):
            job = await self.get(job_id)
            # A running job is marked cancelled here; its worker stops at the next segment.
            return job.job_state if job else None
        return None

    async def queue_snapshot(self, job_id: int) -> QueueSnapshot:
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
            length = await session.scalar(
                select(func.count()).select_from(Job).where(Job.state == JobState.queued.value)
            )
            if job is None or job.state != JobState.queued.value:
                return QueueSnapshot(None, length or 0)
            ahead = await session.scalar(
                select(func.count()).select_from(Job).where(
                    Job.state == JobState.queued.value,
                    or_(
                        Job.priority < job.priority,
                        and_(Job.priority == job.priority, Job.created_at < job.created_at),
                        and_(Job.priority == job.priority, Job.created_at == job.created_at, Job.id < job.id),
                    ),
                )
            )
            return QueueSnapshot((ahead or 0) + 1, length or 0)

    async def queue_length(self) -> int:
        async with self.sessions() as session:
            return await session.scalar(
                select(func.count()).select_from(Job).where(Job.state == JobState.queued.value)
            ) or 0

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

    async def counts_by_state(self) -> dict[str, int]:
        async with self.sessions() as session:
            rows = await session.execute(select(Job.state, func.count()).group_by(Job.state))
            return {state: count for state, count in rows}
