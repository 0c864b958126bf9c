"""The job row, its state machine, and the queries on it.

The row is the source of truth: who asked, where to reply, what was asked, how far it
got, and what came out. Every state change is one guarded, committed UPDATE (`WHERE
state IN (...)`), so two processes can never both move a job, and a restarted bot
finds every job where it was left.

    queued -> fetching -> decoding -> separating -> encoding -> delivering -> done
    any unfinished state -> failed | cancelled; a running state -> queued (retry)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Select,
    Text,
    and_,
    case,
    cast,
    column,
    delete,
    exists,
    false,
    func,
    or_,
    select,
    table,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import load_only, raiseload
from sqlalchemy.sql.elements import ColumnElement

from core.db import database_clock, database_now, rowcount, utcnow
from core.errors import TooLongError
from core.jobs import quotas
from core.jobs.fair_order import fair_order_oldest_first
from core.jobs.job import (
    ALLOWED_FROM,
    FINAL,
    RUN_READS,
    RUN_WRITES,
    RUNNING,
    UNANSWERED,
    UNANSWERED_ERROR,
    UNFINISHED,
    InteractionToken,
    Job,
    JobState,
    Lease,
)
from core.jobs.queue_board import QueueBoard
from core.jobs.quotas import EVERY_SERVER, SERVER, Policy, QuotaBook, QuotaExceeded, QuotaSlot
from core.media.audio import format_duration


@dataclass(frozen=True)
class Recovered:
    """A running job whose heartbeat went stale, taken back by the sweeper."""

    job_id: int
    state: JobState  # where it went: queued, or failed (out of attempts)
    queue_job_id: int | None  # the queue's "run job N" it had (distributed mode), to withdraw


# Why a job that stopped heartbeating too often fails.
STALLED = "the separation stopped answering repeatedly on this track; please try again later"


@dataclass(frozen=True)
class QueueSnapshot:
    position: int | None  # 1-based among queued jobs, None when not queued
    length: int


# A job asked for through an interaction may start only once its status message exists:
# until then there is nothing to show its progress or its end in.
_attached = or_(Job.status_message_id.is_not(None), ~exists().where(InteractionToken.job_id == Job.id))

_guild = func.coalesce(Job.guild_id, 0)
_queued_to_start = and_(Job.state == JobState.queued.value, _attached)

_FINAL_VALUES = [s.value for s in FINAL]

# A challenge (core.challenges, a layer above) refers to its track's split by job id; while
# it waits for the split ("splitting") it reads that job's row.
_challenges = table("challenges", column("job_id"), column("state"))

# The job still holds presigned URLs. (Clearing them writes JSON null, not SQL NULL.)
_has_transfer = and_(Job.transfer.is_not(None), cast(Job.transfer, Text) != "null")

# How a run loads its job: the columns it reads and nothing else (a worker's database role
# may read no other), never the bot's interaction token.
_AS_RUN = (load_only(*(getattr(Job, name) for name in RUN_READS), raiseload=True), raiseload("*"))


# Rows read per step of a long read: the event loop runs between steps.
_PARTITION = 1000

# Columns that decide whether and where a job stands in the queue (`update` may write them).
_QUEUE_COLUMNS = frozenset({"state", "status_message_id", "priority", "created_at", "guild_id", "user_id"})


def _interaction(fields: dict[str, Any]) -> InteractionToken | None:
    """Take the interaction's token out of a new job's fields, into its own row."""
    token, expires_at = fields.pop("interaction_token", None), fields.pop("token_expires_at", None)
    return None if token is None else InteractionToken(token=token, expires_at=expires_at)


def _leased(fields: dict[str, Any]) -> None:
    """A run writes only its own columns of the row (the worker's role may write no other)."""
    others = set(fields) - set(RUN_WRITES)
    if others:
        raise ValueError(f"a run may not write {sorted(others)} of its job")


class JobStore:
    """Queries and guarded transitions on job rows. Every method commits.

    With a QuotaBook, jobs are admitted against their slots, reserve their minutes once
    their length is known, and settle both in the same transaction that ends the job.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], quotas: QuotaBook | None = None) -> None:
        self.sessions = sessions
        self.quotas = quotas
        # Queue places, shared by every status message; changes made here invalidate them.
        self.board = QueueBoard(self._compute_order)

    async def create(self, **fields: Any) -> Job:
        """A job row; `interaction_token` and `token_expires_at` go to its InteractionToken."""
        interaction = _interaction(fields)
        async with self.sessions() as session:
            job = Job(**fields, interaction=interaction)
            session.add(job)
            await session.commit()
            self.board.changed()
            return job

    async def admit(self, policy: Policy, **fields: Any) -> tuple[Job | None, str | None]:
        """Create a queued job if the user and the server have a free slot; else return
        the reason why not. Atomic: concurrent requests never exceed the limits."""
        if self.quotas is None:
            return await self.create(**fields), None
        interaction = _interaction(fields)
        async with self.sessions() as session:
            refusal = await self.quotas.take_slots(session, fields.get("guild_id") or 0, fields["user_id"], policy)
            if refusal is not None:
                await session.rollback()
                return None, refusal
            job = Job(**fields, interaction=interaction, slot_state="held", limits=self.quotas.job_limits(policy))
            session.add(job)
            await session.commit()
            self.board.changed()
            return job, None

    async def reserve(self, job_id: int, seconds: float) -> None:
        """Reserve the job's audio minutes (once; a retried job keeps its reservation).
        Raises TooLongError or QuotaExceeded, reserving nothing.

        Without a QuotaBook (a worker's store: its role has no right on the quota tables)
        it only refuses a track longer than the job's limits allow; the bot reserves the
        minutes when it sees the length on the row (`core.distributed.queue_execution`)."""
        if self.quotas is None:
            async with self.sessions() as session:
                limits = await session.scalar(select(Job.limits).where(Job.id == job_id))
            _check_length(limits, seconds)
            return
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
            # A job that already ended (e.g. cancelled during its download) reserves nothing:
            # it was settled when it ended, so nothing would release this reservation.
            if job is None or job.quota_state != "none" or not job.limits or job.is_final:
                return
            _check_length(job.limits, seconds)
            day = quotas.utc_day()  # looked up when called: tests move the day
            moved = await session.execute(
                update(Job).where(Job.id == job_id, Job.quota_state == "none",
                                  Job.state.in_([s.value for s in UNFINISHED])).values(
                    quota_state="reserved", reserved_s=seconds, quota_day=day))
            if rowcount(moved) != 1:
                await session.rollback()
                return
            # The row keeps the track's length (the results check reads it); the counters take
            # the minutes it costs: its length times the job's cost factor, set at admission.
            refusal = await self.quotas.reserve(session, job.guild_id or 0, job.user_id, seconds, job.limits, day,
                                                cost_factor=job.cost_factor)
            if refusal is not None:
                await session.rollback()
                raise QuotaExceeded(refusal)
            await session.commit()

    async def _settle(self, session: AsyncSession, job_id: int) -> None:
        """Inside a transaction that just ended the job: charge or release its minutes and
        free its slot, each at most once."""
        if self.quotas is None:
            return
        job = await session.get(Job, job_id, populate_existing=True)
        if job is None or not job.is_final:
            return
        guild = job.guild_id or 0
        across = bool((job.limits or {}).get(quotas.ACROSS_SERVERS))
        if job.quota_state == "reserved":
            charge = job.job_state is JobState.done and not job.cache_hit
            moved = await session.execute(update(Job).where(Job.id == job_id, Job.quota_state == "reserved")
                                          .values(quota_state="charged" if charge else "released"))
            if rowcount(moved) == 1:
                assert job.quota_day is not None, "a reservation sets its day"
                await self.quotas.settle(session, guild, job.user_id, job.reserved_s * job.cost_factor,
                                         job.quota_day, charge, across)
        if job.slot_state == "held":
            moved = await session.execute(update(Job).where(Job.id == job_id, Job.slot_state == "held")
                                          .values(slot_state="released"))
            if rowcount(moved) == 1:
                await self.quotas.release_slots(session, guild, job.user_id, across)

    async def settle(self, job_id: int) -> None:
        """Settle a job that ended elsewhere (a worker failed it): charge or release its
        minutes, free its slot, and drop its presigned URLs. Does nothing twice."""
        async with self.sessions() as session:
            await self._settle(session, job_id)
            await session.execute(update(Job).where(Job.id == job_id, Job.state.in_([s.value for s in FINAL]),
                                                    _has_transfer).values(transfer=None))
            await session.commit()

    async def cancel_unattached(self, before: datetime) -> list[int]:
        """Sweeper: cancel queued jobs whose status message never came (the interaction was
        never answered), so they release their slot instead of waiting for ever. Marked
        `UNANSWERED`: the bot tells their users (at its next start at the latest) to send
        the request again."""
        async with self.sessions() as session:
            ids = list(await session.scalars(select(Job.id).where(
                Job.state == JobState.queued.value, ~_attached, Job.created_at < before)))
        return [i for i in ids if await self.transition(i, JobState.cancelled, error=UNANSWERED_ERROR,
                                                        error_kind=UNANSWERED)]

    async def settle_finished(self) -> list[int]:
        """Sweeper: settle finished jobs that still hold a slot, a reservation or presigned URLs."""
        async with self.sessions() as session:
            ids = list(await session.scalars(select(Job.id).where(
                Job.state.in_([s.value for s in FINAL]),
                or_(Job.quota_state == "reserved", Job.slot_state == "held", _has_transfer))))
        for job_id in ids:
            # One transaction per job: it then locks counters in the same order as an
            # admission (the user's, then the server's), so the two cannot deadlock.
            await self.settle(job_id)
        return ids

    async def get(self, job_id: int) -> Job | None:
        async with self.sessions() as session:
            return await session.get(Job, job_id)

    async def require(self, job_id: int) -> Job:
        """The row of a job that must exist (rows are never deleted while a job runs)."""
        job = await self.get(job_id)
        if job is None:
            raise LookupError(f"job {job_id} has no row")
        return job

    async def update(self, job_id: int, lease: Lease | None = None,
                     in_state: JobState | tuple[JobState, ...] | None = None, **fields: Any) -> bool:
        """Set fields without changing the state (progress, message ids, artifacts). With a
        lease (and `in_state`), only while that run still holds the job (in that state).
        Returns whether the row was written."""
        condition = Job.id == job_id
        if lease is not None:
            _leased(fields)
            condition = and_(condition, lease.where())
        if isinstance(in_state, JobState):
            condition = and_(condition, Job.state == in_state.value)
        elif in_state is not None:
            condition = and_(condition, Job.state.in_([s.value for s in in_state]))
        async with self.sessions() as session:
            result = await session.execute(update(Job).where(condition).values({"updated_at": utcnow(), **fields}))
            await session.commit()
            if _QUEUE_COLUMNS.intersection(fields):
                self.board.changed()
            return rowcount(result) == 1

    async def transition(self, job_id: int, to: JobState, lease: Lease | None = None, **fields: Any) -> bool:
        """Move the job to `to` if its current state allows it (and, with a lease, that run
        still holds it). Returns whether it moved. Ending a job settles its quota in the
        same transaction (when this store has the QuotaBook: a worker's has not, and the bot
        settles what a worker ended, see `settle`)."""
        values: dict[str, Any] = {"state": to.value, "updated_at": utcnow(), **fields}
        if to in FINAL:
            values.setdefault("finished_at", utcnow())
            if lease is None:  # a run leaves the bot's columns to the bot (`settle`)
                values.setdefault("transfer", None)  # presigned URLs are of no use any more
        if to in RUNNING:
            values.setdefault("progress", 0.0)
        allowed = [s.value for s in ALLOWED_FROM[to]]
        condition = and_(Job.id == job_id, Job.state.in_(allowed))
        if lease is not None:
            _leased(values)
            condition = and_(condition, lease.where())
        async with self.sessions() as session:
            result = await session.execute(update(Job).where(condition).values(**values))
            moved = rowcount(result) == 1
            if moved and to in FINAL:
                await self._settle(session, job_id)
            await session.commit()
            if moved:
                self.board.changed()
            return moved

    async def _fair_order(self, session: AsyncSession) -> list[int]:
        """The queued jobs' ids in fair order. Two indexed queries that return only plain
        numbers, the jobs oldest first (so no timestamp is read, parsed or compared in
        Python); the order itself is computed in a thread, off the event loop."""
        # Read in partitions, so that the loop runs between them.
        rows: list[Any] = []
        result = await session.stream(queued_oldest_first().execution_options(yield_per=_PARTITION))
        async for partition in result.partitions():
            rows.extend(partition)
        if not rows:
            return []
        served = (await session.execute(served_lately(utcnow() - timedelta(days=1)))).all()
        return await asyncio.to_thread(_order_rows, rows, served)

    async def claim_next(self, worker: str) -> Job | None:
        """Take the next queued job in fair order (see `fair_order`) for `worker`, atomically."""
        async with self.sessions() as session:
            while True:
                order = await self._fair_order(session)
                if not order:
                    return None
                candidate = order[0]
                now = utcnow()
                result = await session.execute(
                    update(Job).where(Job.id == candidate, Job.state == JobState.queued.value).values(
                        state=JobState.fetching.value, worker=worker, started_at=now, updated_at=now,
                        heartbeat_at=database_clock(), attempts=Job.attempts + 1, progress=0.0,
                    )
                )
                await session.commit()
                self.board.changed()
                if rowcount(result) == 1:
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
                    state=JobState.decoding.value, worker=worker, heartbeat_at=database_clock(), updated_at=now,
                    progress=0.0,
                ).returning(Job.attempts))
            await session.commit()
            if attempt is None:
                return None
            job = await session.get(Job, job_id, populate_existing=True, options=_AS_RUN)
            return None if job is None else (job, Lease(worker, attempt))

    async def request_cancel(self, job_id: int) -> JobState | None:
        """Cancel a queued or running job (a running one stops at its worker's next
        segment). Returns the new state, or None when it was already too late."""
        if await self.transition(job_id, JobState.cancelled, error="cancelled", error_kind="cancelled"):
            return JobState.cancelled
        return None

    async def queue_snapshot(self, job_id: int) -> QueueSnapshot:
        """The job's place in the fair order: one computation shared by every caller until
        the queue changes (see `QueueBoard`), then a dictionary look-up."""
        places = await self.board.places()
        return QueueSnapshot(places.places.get(job_id), places.length)

    async def queued_to_show(self, margin: timedelta = timedelta(seconds=60)) -> list[Job]:
        """Queued jobs whose status message can still be edited: their interaction token
        has more than `margin` left (see `Job.token_usable`). Jobs whose token expired
        cannot show a new place, so they are not even loaded."""
        jobs: list[Job] = []
        async with self.sessions() as session:
            result = await session.stream_scalars(
                editable_queued(utcnow() + margin).execution_options(yield_per=_PARTITION // 10))
            async for partition in result.partitions():
                jobs.extend(partition)
        return jobs

    async def _compute_order(self) -> list[int]:
        async with self.sessions() as session:
            return await self._fair_order(session)

    async def queue_length(self) -> int:
        async with self.sessions() as session:
            return await session.scalar(
                select(func.count()).select_from(Job).where(Job.state == JobState.queued.value)
            ) or 0

    async def find_cached(self, job: Job) -> Job | None:
        """A delivered job with the same audio (content hash), model, stems, format and
        rendering (tempo, transpose, mix: a plain split is never served for a job at 80%
        speed) whose files are still kept."""
        if not job.input_sha256:
            return None
        async with self.sessions() as session:
            return await session.scalar(
                select(Job).where(
                    Job.input_sha256 == job.input_sha256, Job.model == job.model, Job.stems == job.stems,
                    # A chain's stems are not its first model's alone.
                    Job.clean_model.is_(None) if job.clean_model is None else Job.clean_model == job.clean_model,
                    Job.format == job.format, Job.render_options == (job.render_options or ""),
                    Job.state == JobState.done.value, Job.id != job.id,
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
            across = Job.limits[quotas.ACROSS_SERVERS].as_boolean()  # NULL for jobs that did not count there
            held = (await session.execute(
                select(guild, Job.user_id, across, func.count()).where(Job.slot_state == "held")
                .group_by(guild, Job.user_id, across)
            )).all()
            counts: dict[tuple[int, int], int] = {}
            for g, u, counted_across, n in held:
                keys = [(g, u), (g, SERVER)]
                if counted_across:
                    keys += [(EVERY_SERVER, u), (EVERY_SERVER, SERVER)]
                for key in keys:
                    counts[key] = counts.get(key, 0) + n
            for slot in slots:
                slot.active = counts.pop((slot.guild_id, slot.user_id), 0)
            for (g, u), n in counts.items():
                session.add(QuotaSlot(guild_id=g, user_id=u, active=n))
            await session.commit()

    async def delete_history(self, before: datetime, batch: int = 500) -> int:
        """Sweeper: delete the rows of jobs that ended before `before` and hold nothing any
        more (see `expired_history`), `batch` rows per transaction, the loop running between
        batches. Returns how many went."""
        deleted = 0
        while True:
            async with self.sessions() as session:
                ids = list(await session.scalars(expired_history(before, batch)))
                if not ids:
                    return deleted
                # Their tokens first: SQLite enforces the foreign key only where it is switched on.
                await session.execute(delete(InteractionToken).where(InteractionToken.job_id.in_(ids)))
                result = await session.execute(delete(Job).where(Job.id.in_(ids), Job.state.in_(_FINAL_VALUES)))
                await session.commit()
            deleted += rowcount(result)
            if len(ids) < batch or rowcount(result) == 0:  # the rest is not to delete (yet)
                return deleted
            await asyncio.sleep(0)

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

    async def delivering(self, limit: int, besides: Iterable[int] = ()) -> list[Job]:
        """Jobs in `delivering` but those of `besides`, oldest first, `limit` at most."""
        query = select(Job).where(Job.state == JobState.delivering.value)
        if skipped := list(besides):
            query = query.where(Job.id.not_in(skipped))
        async with self.sessions() as session:
            return list(await session.scalars(query.order_by(Job.id).limit(limit)))

    async def untold_endings(self, since: datetime) -> list[Job]:
        """Failed or cancelled jobs, ended after `since`, whose user was never told (the bot
        stopped first, or a worker ended them while the bot was down), oldest first."""
        async with self.sessions() as session:
            rows = await session.scalars(select(Job).where(
                Job.state.in_([JobState.failed.value, JobState.cancelled.value]), Job.notified_at.is_(None),
                Job.finished_at > since).order_by(Job.id))
            return list(rows)

    async def requeue_running(self, worker: str | None = None) -> list[int]:
        """Put jobs that were running (on `worker`, or anywhere) back in the queue, e.g.
        after the process running them died. Their attempt count is kept."""
        async with self.sessions() as session:
            condition: ColumnElement[bool] = Job.state.in_([s.value for s in RUNNING])
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
                self.board.changed()
            return ids

    async def beat(self, job_id: int, lease: Lease, in_state: JobState | tuple[JobState, ...] = RUNNING,
                   **fields: Any) -> bool:
        """A run's heartbeat on its job (with `fields`, progress say), written on the
        database's clock: the sweeper compares it with that clock, so a worker whose own
        clock is off is neither taken for dead nor kept alive once silent. Returns whether
        the run still holds the job (in `in_state`)."""
        return await self.update(job_id, lease=lease, in_state=in_state, heartbeat_at=database_clock(), **fields)

    async def recover_stale(self, stale_s: float, max_attempts: int) -> list[Recovered]:
        """Sweeper: running jobs whose heartbeat is older than `stale_s` on the database's
        clock (their run died, hung or lost its database): back to the queue, or, after
        `max_attempts` attempts, failed
        and settled (nothing charged). A job in `fetching` that the queue holds for a worker
        (distributed mode) is waiting, not running, and stays. Each job is moved by one
        UPDATE guarded on the state, attempt, worker and old heartbeat it was found with, so
        a heartbeat written meanwhile keeps it; the attempt stays as it was and the next
        claim counts one more, so the lease of the old run matches no more: a late write of
        that run cannot finish the job."""
        beat = func.coalesce(Job.heartbeat_at, Job.updated_at)
        async with self.sessions() as session:
            before = await database_now(session) - timedelta(seconds=stale_s)
        stale = and_(beat < before, or_(Job.state.in_([s.value for s in RUNNING if s is not JobState.fetching]),
                                        and_(Job.state == JobState.fetching.value, Job.queue_job_id.is_(None))))
        async with self.sessions() as session:
            found = (await session.execute(
                select(Job.id, Job.state, Job.attempts, Job.worker, Job.queue_job_id).where(stale))).all()
        recovered: list[Recovered] = []
        for job_id, state, attempts, worker, queue_job_id in found:
            same_run = and_(Job.id == job_id, Job.state == state, Job.attempts == attempts, stale,
                            Job.worker.is_(None) if worker is None else Job.worker == worker)
            out = attempts >= max_attempts
            values: dict[str, Any] = {"worker": None, "heartbeat_at": None, "queue_job_id": None,
                                      "updated_at": utcnow()}
            if out:
                values.update(state=JobState.failed.value, finished_at=utcnow(), error=STALLED,
                              error_kind="stalled", transfer=None)
            else:
                values.update(state=JobState.queued.value, progress=0.0)
            async with self.sessions() as session:
                moved = rowcount(await session.execute(update(Job).where(same_run).values(**values))) == 1
                if moved and out:
                    await self._settle(session, job_id)
                await session.commit()
            if moved:
                self.board.changed()
                recovered.append(Recovered(job_id, JobState.failed if out else JobState.queued, queue_job_id))
        return recovered

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
                self.board.changed()
            return ids

    async def counts_by_state(self) -> dict[str, int]:
        async with self.sessions() as session:
            rows = await session.execute(select(Job.state, func.count()).group_by(Job.state))
            return {state: count for state, count in rows}

    # -- the operator's actions (`stembot jobs`) --------------------------------------------

    async def latest(self, state: JobState | None = None, limit: int = 20) -> list[Job]:
        """The newest jobs (in `state`), newest first."""
        async with self.sessions() as session:
            query = select(Job).order_by(Job.id.desc()).limit(limit)
            if state is not None:
                query = query.where(Job.state == state.value)
            return list(await session.scalars(query))

    async def retry(self, job_id: int) -> JobState | None:
        """Operator: put a failed job, or one stuck in a running state, back in the queue.
        Returns the state it left, or None when it is in neither (or moved meanwhile).

        Its attempt count is kept, never reset: the next claim counts one more, so the lease
        of a run still under way (its worker and attempt) matches the row no more and that
        run can write nothing of the job again. A running job keeps its slot and its one
        reservation. A failed job takes its slot again (whatever the limits: the operator
        decides) and reserves its minutes anew when its length is known; if it still held
        its slot or reservation (not settled yet), it keeps them instead."""
        retryable = [s.value for s in (*RUNNING, JobState.failed)]
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
            if job is None or job.state not in retryable:
                return None
            was = job.job_state
            values: dict[str, Any] = {"state": JobState.queued.value, "worker": None, "progress": 0.0,
                                      "heartbeat_at": None, "queue_job_id": None, "updated_at": utcnow()}
            take_slot = False
            if was is JobState.failed:
                values.update(error=None, error_kind=None, finished_at=None, delivered_at=None, notified_at=None,
                              transfer=None, artifacts=None, artifacts_deleted_at=None, duration_s=None,
                              separation_s=None, cache_hit=False)
                if job.quota_state == "released":
                    values.update(quota_state="none", reserved_s=0.0, quota_day=None)
                take_slot = self.quotas is not None and job.slot_state == "released"
                if take_slot:
                    values["slot_state"] = "held"
            # Guarded on what was read: a concurrent claim, settle or retry makes it a no-op.
            moved = await session.execute(update(Job).where(
                Job.id == job_id, Job.state == job.state, Job.attempts == job.attempts,
                Job.slot_state == job.slot_state, Job.quota_state == job.quota_state).values(**values))
            if rowcount(moved) != 1:
                await session.rollback()
                return None
            if take_slot:
                assert self.quotas is not None  # see take_slot
                await self.quotas.hold_slots(session, job.guild_id or 0, job.user_id,
                                             bool((job.limits or {}).get(quotas.ACROSS_SERVERS)))
            await session.commit()
            return was

    async def fail_by_operator(self, job_id: int, reason: str) -> bool:
        """Operator: end an unfinished job `failed` with `reason`, settling its slot and
        reservation once (see `transition`). Its worker column is cleared, so the lease of a
        run still under way matches no more. Returns whether it moved."""
        return await self.transition(job_id, JobState.failed, error=reason, error_kind="operator", worker=None)


def _check_length(limits: dict[str, Any] | None, seconds: float) -> None:
    if limits and seconds > limits["max_track_s"]:
        raise TooLongError(f"the track is {format_duration(seconds)} long; this server allows up to "
                           f"{format_duration(limits['max_track_s'])}")


def queued_oldest_first() -> Select[int, int, int, int]:
    """The queued jobs that may start, as (id, priority, server, user), oldest first."""
    return (select(Job.id, Job.priority, _guild, Job.user_id).where(_queued_to_start)
            .order_by(Job.created_at, Job.id))


def served_lately(since: datetime) -> Select[int, int, datetime | None]:
    """When each (server, user) with a queued job was last served since `since`. Only
    servers with queued jobs matter; the range on started_at uses its index, which
    holds the server and user too (the rows are not read)."""
    return (select(_guild, Job.user_id, func.max(Job.started_at))
            .where(Job.started_at > since, _guild.in_(select(_guild).where(_queued_to_start).distinct()))
            .group_by(_guild, Job.user_id))


def editable_queued(expiring_after: datetime) -> Select[Job]:
    """Queued jobs with a status message and an interaction token valid after `expiring_after`."""
    return (select(Job).join(InteractionToken, InteractionToken.job_id == Job.id)
            .where(Job.state == JobState.queued.value, Job.status_message_id.is_not(None),
                   InteractionToken.expires_at > expiring_after).order_by(Job.id))


def expired_history(before: datetime, limit: int) -> Select[int]:
    """Ids of up to `limit` jobs, oldest first, that ended before `before` and hold nothing
    any more: their files deleted, their slot and minutes settled, no presigned URLs, and
    not the split of a challenge still waiting for it. Their rows can go; the minutes they
    used stay counted in quota_usage."""
    # Only an ended job has a finished_at (a retry clears it): no test of the state here, or
    # a planner might walk the index of states (every done job) instead of this range.
    return (select(Job.id).where(
        Job.finished_at < before, Job.artifacts_deleted_at.is_not(None),
        Job.quota_state != "reserved", Job.slot_state != "held", ~_has_transfer,
        ~exists().where(_challenges.c.job_id == Job.id, _challenges.c.state == "splitting"),
    ).order_by(Job.finished_at).limit(limit))


def _order_rows(rows: Sequence[Any], served: Sequence[Any]) -> list[int]:
    """`fair_order` of the queued rows (id, priority, server, user; oldest first) given
    the served ones (run in a thread)."""
    last_user = {(g, u): _timestamp(t) for g, u, t in served if t is not None}  # None: filtered out
    last_guild: dict[int, float] = {}
    for (g, _), t in last_user.items():
        last_guild[g] = max(last_guild.get(g, t), t)
    return fair_order_oldest_first(rows, last_guild, last_user)


def _timestamp(moment: datetime) -> float:
    if moment.tzinfo is None:  # SQLite drops the zone; stored values are UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
