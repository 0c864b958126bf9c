"""Running one job on a model host: decode -> separate -> encode, written to its row.

The same code runs in both modes: in embedded mode the bot's dispatcher calls it with
the bot's own model host and local files; in distributed mode `stembot worker` calls it
for each job the queue hands it, with files reached through presigned URLs. Every write
is fenced by the run's lease (see `core.jobs.store.Lease`), so a worker that was presumed dead
and taken over cannot finish the job a second time.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core.db import utcnow
from core.errors import InputError, StembotError
from core.host.handle import HostCrashed, HostHandle
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
from core.jobs.job import Job, JobState, Lease
from core.jobs.store import JobStore

log = logging.getLogger(__name__)

# Awaited with a job's id after each committed change the bot shows.
OnChange = Callable[[int], Awaitable[None]]


class Outcome(enum.StrEnum):
    delivering = "delivering"  # stems stored; the bot delivers them
    failed = "failed"
    cancelled = "cancelled"
    requeued = "requeued"  # the model host crashed; the job went back to the queue
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
        taken = await self.store.take(job_id, self.worker_name)
        if taken is None:
            return Outcome.skipped
        job, lease = taken
        if lease.attempt > self.config.max_attempts:
            # Taken over once too often: its workers keep dying on this track.
            await self.store.transition(job_id, JobState.failed, lease=lease, error_kind="worker_crashed",
                                        error="the separation crashed repeatedly on this track")
            return Outcome.failed
        notify = on_change or _nothing
        await notify(job_id)
        try:
            return await self._run(job, lease, notify)
        finally:
            await self.files.discard(job)

    async def _run(self, job: Job, lease: Lease, notify: OnChange) -> Outcome:
        try:
            input_file = await self.files.input_file(job)
        except StembotError as exc:
            return await self._fail(job.id, lease, exc.reason, exc.kind)
        spec = JobSpec(
            job_id=job.id, input_path=str(input_file), stems_dir=str(self.files.stems_dir(job)),
            model=job.model, stems=job.stems, format=job.format,
            mp3_bitrate_kbps=self.config.mp3_bitrate_kbps, attachment_limit=job.attachment_size_limit,
            # The bot's object store presigns download links even when this worker's own
            # settings know of no way to serve them.
            links_available=self.config.links_available or bool((job.transfer or {}).get("links_available")),
            link_valid_hours=self.config.link_valid_hours,
        )
        refused: list[InputError] = []
        last_write = [0.0]

        async def on_event(event: JobProgressEvent) -> None:
            match event:
                case StageEvent(stage="separating", duration_s=duration_s):
                    assert duration_s is not None  # the host says the length as separating starts
                    try:
                        # The container did not tell the length: reserve now that it is decoded.
                        await self.store.reserve(job.id, duration_s)
                    except InputError as exc:
                        refused.append(exc)
                        self.host.cancel(job.id)
                        return
                    moved = await self.store.transition(job.id, JobState.separating, lease=lease,
                                                        duration_s=duration_s)
                case StageEvent(stage="encoding"):
                    moved = await self.store.transition(job.id, JobState.encoding, lease=lease)
                case ProgressEvent(fraction=fraction):
                    now = time.monotonic()
                    if now - last_write[0] < self.config.progress_write_interval_s:
                        return
                    last_write[0] = now
                    moved = await self.store.update(job.id, lease=lease, in_state=JobState.separating,
                                                    progress=fraction, heartbeat_at=utcnow())
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
            if lease.attempt < self.config.max_attempts and await self.store.transition(
                    job.id, JobState.queued, lease=lease, worker=None):
                await notify(job.id)
                return Outcome.requeued
            return await self._fail(job.id, lease, "the separation crashed repeatedly on this track",
                                    "worker_crashed")
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
        if await self.store.transition(job.id, JobState.delivering, lease=lease, artifacts=artifacts,
                                       progress=1.0, duration_s=done.duration_s,
                                       separation_s=done.separation_s):
            return Outcome.delivering
        return Outcome.cancelled

    async def _fail(self, job_id: int, lease: Lease, reason: str, kind: str | None) -> Outcome:
        if await self.store.transition(job_id, JobState.failed, lease=lease, error=reason,
                                       error_kind=kind or "error"):
            return Outcome.failed
        return Outcome.cancelled


async def _nothing(job_id: int) -> None:
    return None
