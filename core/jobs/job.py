"""The job row and its state machine.

    queued -> fetching -> decoding -> separating -> encoding -> delivering -> done
    any unfinished state -> failed | cancelled; a running state -> queued (retry)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    and_,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

from core.db import Base, UTCDateTime, utcnow
from core.jobs.job_state import FINAL, RUNNING, UNFINISHED, JobState

# A job cancelled because its request was never answered in the chat (the bot stopped
# between admitting it and acknowledging the interaction): its user is told to send it again.
UNANSWERED = "unanswered"
UNANSWERED_ERROR = "the bot restarted before it answered the request"


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
    # The fair order's "who was served lately" (`JobStore._fair_order`): a range of
    # started_at, read from the index alone. (Queued jobs are found by `state`'s index.)
    # The sweeper's old rows (`expired_history`) and the files past retention: a range of
    # finished_at, oldest first.
    __table_args__ = (Index("ix_jobs_started_at_guild_user", "started_at", "guild_id", "user_id"),
                      Index("ix_jobs_finished_at", "finished_at"))

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
    status_message_id: Mapped[int | None] = mapped_column(BigInteger)
    attachment_size_limit: Mapped[int] = mapped_column(BigInteger, default=10 * 1024 * 1024)

    # What was asked.
    source_kind: Mapped[str] = mapped_column(String(16))  # "attachment", "url" or "stream" (yt-dlp)
    source_url: Mapped[str] = mapped_column(Text)
    source_name: Mapped[str] = mapped_column(String(255))
    source_size: Mapped[int | None] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(64))
    stems: Mapped[str] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)  # lower runs first
    # Tempo, transpose and mix (core.media.render.RenderOptions, canonical JSON; "" for the
    # stems as separated): text, so that the results cache compares it as it compares `stems`.
    render_options: Mapped[str] = mapped_column(String(255), default="", server_default="")
    # Minutes charged per audio minute: the model's cost factor (core.separation.published), the
    # sum of its models' for a chain. The bot's, set at admission: a run neither reads nor writes it.
    cost_factor: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    # A chain (`/split clean:`): this model runs on the vocals `model` separated, and `stems`
    # are its outputs. None: `model` alone.
    clean_model: Mapped[str | None] = mapped_column(String(128))

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
    # (see core.jobs.quotas for the rules).
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
    # When its user was told how it ended (the result delivered, or why it failed or was
    # cancelled): a restarted bot tells the ones left untold, once (see Dispatcher.start).
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # The bot's alone, in a table of its own that workers cannot read (see InteractionToken).
    # Loaded with the job by the bot's queries; a run's queries never load it (RUN_READS).
    interaction: Mapped[InteractionToken | None] = relationship(
        lazy="selectin", cascade="all, delete-orphan", passive_deletes=True)

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)

    @property
    def is_final(self) -> bool:
        return self.job_state in FINAL

    @property
    def interaction_token(self) -> str | None:
        """The webhook token of the interaction that asked for the job, if any."""
        return self.interaction.token if self.interaction is not None else None

    @property
    def token_expires_at(self) -> datetime | None:
        return self.interaction.expires_at if self.interaction is not None else None

    def token_usable(self, now: datetime | None = None, margin: timedelta = timedelta(seconds=60)) -> bool:
        """Whether the interaction token still has time to edit the reply or follow up."""
        if not self.interaction_token or self.token_expires_at is None:
            return False
        return (now or utcnow()) + margin < self.token_expires_at


class InteractionToken(Base):
    """The webhook token of the interaction a job answers: valid for 15 minutes, it lets
    whoever holds it post and edit as the bot in that conversation, and lets a restarted
    bot edit the reply. Only the bot reads it: it lives apart from the job row, which
    workers read, and the workers' database role has no right on this table."""

    __tablename__ = "interaction_tokens"
    # The queued jobs whose message can still be edited (`JobStore.queued_to_show`): the few
    # tokens of the last 15 minutes, found by a range of expires_at.
    __table_args__ = (Index("ix_interaction_tokens_expires_at", "expires_at"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    token: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# What a run of a job (`core.jobs.runner`, on a `stembot worker` in distributed mode) reads
# and writes of the job's row, and nothing else: the workers' database role is granted
# exactly these columns (`core.distributed.worker_role`), and the store refuses a leased
# write of any other field. The rest (who asked, quotas, the presigned URLs the bot sets)
# is the bot's.
RUN_READS = ("id", "state", "attempts", "worker", "source_name", "model", "clean_model", "stems", "format",
             "render_options", "attachment_size_limit", "limits", "transfer")
RUN_WRITES = ("state", "updated_at", "progress", "attempts", "worker", "heartbeat_at", "finished_at", "duration_s",
              "separation_s", "artifacts", "error", "error_kind")
# The states of the rows a run changes (it takes a job the bot is handing over, in
# `fetching`), the states it may leave them in, and so the rows it must be able to read
# (PostgreSQL checks the new row of an UPDATE against the reading policy too).
RUN_FROM = RUNNING
RUN_TO = (*RUNNING, JobState.queued, JobState.delivering, JobState.failed)
RUN_SEES = (*UNFINISHED, JobState.failed)


@dataclass(frozen=True)
class Lease:
    """Which worker runs a job, and in which attempt. Every write of that run is fenced by
    it, so a worker presumed dead cannot move a job that another worker has taken over."""

    worker: str
    attempt: int

    def where(self) -> ColumnElement[bool]:
        return and_(Job.worker == self.worker, Job.attempts == self.attempt)


