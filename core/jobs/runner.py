"""Running one job on a model host: decode -> separate -> encode, written to its row.

The same code runs in both modes: in embedded mode the bot's dispatcher calls it with
the bot's own model host and local files; in distributed mode `stembot worker` calls it
for each job the queue hands it, with files reached through presigned URLs. Every write
is fenced by the run's lease (see `core.jobs.store.Lease`), so a worker that was presumed dead
and taken over cannot finish the job a second time.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core.errors import InputError, StembotError
from core.host.handle import HostCrashed, HostHandle, HostTimedOut
from core.host.protocol import (
    CancelledEvent,
    DoneEvent,
    FailedEvent,
    JobProgressEvent,
    JobResult,
    JobSpec,
    ProgressEvent,
    StageEvent,
)
from core.jobs.heartbeat import heartbeat
from core.jobs.job import Job, JobState, Lease
from core.jobs.store import JobStore
from core.jobs.write_retry import DATABASE_ERRORS, WriteAbandoned, retry_write

log = logging.getLogger(__name__)

CRASHED = "the separation crashed repeatedly on this track"
TIMED_OUT = "the separation took far too long on this track, more than once; please try again later"

# Awaited with a job's id after each committed change the bot shows.
OnChange = Callable[[int], Awaitable[None]]


class Outcome(enum.StrEnum):
    delivering = "delivering"  # stems stored; the bot delivers them
    failed = "failed"
    cancelled = "cancelled"
    requeued = "requeued"  # the model host crashed; the job went back to the queue
    abandoned = "abandoned"  # the database did not answer in time; left to the sweeper (recover_stale)
    skipped = "skipped"  # not there to run (cancelled or finished meanwhile)


class JobFiles(Protocol):
    """Where a run reads its input and leaves its stems."""

    async def input_file(self, job: Job) -> Path:
        """The job's input on this machine's disk."""

    def stems_dir(self, job: Job) -> Path:
        """The folder the model host writes the stems into."""

    async def publish(self, job: Job, artifacts: dict[str, Any]) -> None:
        """Store the stems where the bot delivers them from."""

    async def discard(self, job: Job) -> None:
        """Remove what this run left on this machine."""


@dataclass(frozen=True)
class RunConfig:
    max_attempts: int = 3
    mp3_bitrate_kbps: int = 320
    links_available: bool = False
    link_valid_hours: float = 24.0
    progress_write_interval_s: float = 2.0
    # The run writes its heartbeat every stale_s / 4, and retries a write of its job's state
    # for stale_s before it gives the job up to the sweeper (STEMBOT_JOB_STALE_S).
    stale_s: float = 300.0


class JobRunner:
    def __init__(self, store: JobStore, host: HostHandle, files: JobFiles, worker_name: str,
                 config: RunConfig = RunConfig()):
        self.store = store
        self.host = host
        self.files = files
        self.worker_name = worker_name
        self.config = config

    async def run(self, job_id: int, on_change: OnChange | None = None) -> Outcome:
        """Run (or take over) job `job_id`. `on_change(job_id)` is awaited after each
        committed change the bot shows (stage, progress)."""
        try:
            taken = await retry_write(f"job {job_id}'s start", lambda: self.store.take(job_id, self.worker_name),
                                      self.config.stale_s)
        except WriteAbandoned as exc:
            log.error("job %s: %s; leaving it to the sweeper", job_id, exc)
            return Outcome.abandoned
        if taken is None:
            return Outcome.skipped
        job, lease = taken
        try:
            if lease.attempt > self.config.max_attempts:
                # Taken over once too often: its workers keep dying on this track.
                return await self._fail(job_id, lease, CRASHED, "worker_crashed")
            notify = _quiet(on_change or _nothing)
            await notify(job_id)
            try:
                async with self._heartbeats(job_id, lease):
                    return await self._run(job, lease, notify)
            finally:
                await self.files.discard(job)
        except WriteAbandoned as exc:
            # The database is away for longer than a run waits: the job's heartbeat goes
            # stale, and the sweeper puts it back in the queue (or fails it).
            log.error("job %s: %s; leaving it to the sweeper", job_id, exc)
            self.host.cancel(job_id)
            return Outcome.abandoned

    @contextlib.asynccontextmanager
    async def _heartbeats(self, job_id: int, lease: Lease) -> AsyncIterator[None]:
        """Write the run's heartbeat on its row every stale_s / 4 while the body runs,
        whatever the stage (decoding and encoding report no progress). A heartbeat the
        database refuses is skipped; one fenced out (the job was taken back) stops the host's
        work on it."""
        async with heartbeat(self.store, job_id, lease, self.config.stale_s / 4,
                             on_fenced=lambda: self.host.cancel(job_id)):
            yield

    async def _write(self, job_id: int, what: str, write: Callable[[], Awaitable[bool]]) -> bool:
        """A write of the job's state, retried through a short database outage."""
        return await retry_write(f"job {job_id}'s {what}", write, self.config.stale_s)

    async def _run(self, job: Job, lease: Lease, notify: OnChange) -> Outcome:
        try:
            input_file = await self.files.input_file(job)
        except StembotError as exc:
            return await self._fail(job.id, lease, exc.reason, exc.kind)
        spec = job_spec(job, input_file, self.files.stems_dir(job), self.config)
        refused: list[InputError] = []
        last_write = [0.0]

        async def on_event(event: JobProgressEvent) -> None:
            match event:
                case StageEvent(stage="separating", duration_s=duration_s):
                    assert duration_s is not None  # the host says the length as separating starts
                    try:
                        # The container did not tell the length: reserve now that it is decoded.
                        await retry_write(f"job {job.id}'s reservation", lambda: self.store.reserve(job.id, duration_s),
                                          self.config.stale_s)
                    except InputError as exc:
                        refused.append(exc)
                        self.host.cancel(job.id)
                        return
                    moved = await self._write(job.id, "stage", lambda: self.store.transition(
                        job.id, JobState.separating, lease=lease, duration_s=duration_s))
                case StageEvent(stage="encoding"):
                    moved = await self._write(job.id, "stage", lambda: self.store.transition(
                        job.id, JobState.encoding, lease=lease))
                case ProgressEvent(fraction=fraction):
                    now = time.monotonic()
                    if now - last_write[0] < self.config.progress_write_interval_s:
                        return
                    last_write[0] = now
                    try:
                        moved = await self.store.beat(job.id, lease, JobState.separating, progress=fraction)
                    except DATABASE_ERRORS as exc:
                        # Not worth failing a job for: the next one (or the stage) says more.
                        log.warning("job %s: progress not written (%s)", job.id, type(exc).__name__)
                        return
                case _:
                    return
            if not moved:
                # Cancelled meanwhile, or taken over by another worker: stop at the next segment.
                self.host.cancel(job.id)
                return
            await notify(job.id)

        try:
            result = await self.host.run(spec, on_event)
        except HostCrashed as exc:
            log.warning("job %s: %s (attempt %d)", job.id, exc, lease.attempt)
            if lease.attempt < self.config.max_attempts and await self._write(
                    job.id, "return to the queue",
                    lambda: self.store.transition(job.id, JobState.queued, lease=lease, worker=None)):
                await notify(job.id)
                return Outcome.requeued
            if isinstance(exc, HostTimedOut):
                return await self._fail(job.id, lease, TIMED_OUT, "deadline")
            return await self._fail(job.id, lease, CRASHED, "worker_crashed")
        except StembotError as exc:  # the host could not be (re)started
            return await self._fail(job.id, lease, exc.reason, exc.kind)

        match result:
            case CancelledEvent() if refused:
                return await self._fail(job.id, lease, refused[0].reason, refused[0].kind)
            case CancelledEvent():
                return Outcome.cancelled
            case FailedEvent(reason=reason, kind=kind):
                return await self._fail(job.id, lease, reason, kind)
            case DoneEvent(result=done):
                return await self._deliver(job, lease, done)

    async def _deliver(self, job: Job, lease: Lease, done: JobResult) -> Outcome:
        """Publish a separated job's stems and hand it to the bot to deliver."""
        artifacts = done.artifacts()
        try:
            await self.files.publish(job, artifacts)
        except StembotError as exc:
            return await self._fail(job.id, lease, exc.reason, exc.kind)
        if await self._write(job.id, "result", lambda: self.store.transition(
                job.id, JobState.delivering, lease=lease, artifacts=artifacts, progress=1.0,
                duration_s=done.duration_s, separation_s=done.separation_s)):
            return Outcome.delivering
        # A try whose commit went through but whose answer was lost (the connection dropped)
        # leaves the row in `delivering` already, still this run's.
        if await self._write(job.id, "result", lambda: self.store.update(
                job.id, lease=lease, in_state=JobState.delivering)):
            return Outcome.delivering
        return Outcome.cancelled

    async def _fail(self, job_id: int, lease: Lease, reason: str, kind: str | None) -> Outcome:
        if await self._write(job_id, "failure", lambda: self.store.transition(
                job_id, JobState.failed, lease=lease, error=reason, error_kind=kind or "error")):
            return Outcome.failed
        return Outcome.cancelled


def job_spec(job: Job, input_file: Path, stems_dir: Path, config: RunConfig) -> JobSpec:
    """What the model host is asked to do for `job`: all of it read from the job's row
    (`RUN_READS`), which is how a request's options reach a worker in distributed mode."""
    return JobSpec(
        job_id=job.id, input_path=str(input_file), stems_dir=str(stems_dir),
        model=job.model, clean_model=job.clean_model, stems=job.stems, format=job.format,
        render=job.render_options or "",
        mp3_bitrate_kbps=config.mp3_bitrate_kbps, attachment_limit=job.attachment_size_limit,
        # The bot's object store presigns download links even when this worker's own
        # settings know of no way to serve them.
        links_available=config.links_available or bool((job.transfer or {}).get("links_available")),
        link_valid_hours=config.link_valid_hours,
    )


async def _nothing(job_id: int) -> None:
    return None


def _quiet(notify: OnChange) -> OnChange:
    """`notify`, whose failures (it reads the row again) are logged, never raised: showing a
    change is not worth abandoning the run for."""
    async def quiet(job_id: int) -> None:
        try:
            await notify(job_id)
        except Exception:  # logged; the next change shows again
            log.warning("job %s: could not show its change", job_id, exc_info=True)
    return quiet
