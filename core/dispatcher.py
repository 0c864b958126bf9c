"""The dispatcher: takes queued jobs from SQL, runs them on a worker, hands results on.

It lives in the bot's event loop and only awaits: fetching is async I/O and separation
happens in the model host process. Everything it learns goes into the job row first;
the notifier (the Discord side) is told afterwards, so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from .audio import Limits, probe
from .delivery import fits, links_note
from .errors import InputError, StembotError
from .fetch import download
from .jobs import Job, JobState, JobStore
from .model_host import JobSpec
from .storage import LocalStorage
from .worker import LocalWorker, WorkerCrashed

log = logging.getLogger(__name__)


class Notifier(Protocol):
    """What the dispatcher tells the outside world. Implemented by the bot."""

    async def job_changed(self, job: Job) -> None:
        """State, progress or queue position changed (callers throttle their edits)."""

    async def deliver(self, job: Job) -> None:
        """Send the results of a job in `delivering`. Raise to have it retried."""

    async def job_ended(self, job: Job) -> None:
        """The job failed or was cancelled; `job.error` says why."""


@dataclass
class DispatcherConfig:
    worker_name: str = "local"
    max_attempts: int = 3
    limits: Limits = Limits()
    mp3_bitrate_kbps: int = 320
    links_available: bool = False
    link_valid_hours: float = 24.0
    progress_write_interval_s: float = 2.0
    delivery_retry_delays_s: tuple[float, ...] = (1.0, 5.0, 15.0)


class Dispatcher:
    def __init__(self, store: JobStore, worker: LocalWorker, storage: LocalStorage, notifier: Notifier,
                 config: DispatcherConfig = DispatcherConfig(), metrics=None):
        self.store = store
        self.worker = worker
        self.storage = storage
        self.notifier = notifier
        self.config = config
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._reported: set[int] = set()  # jobs whose end was already reported
        self._deliveries: set[asyncio.Task] = set()
        self.paused = False

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left, then start taking jobs."""
        requeued = await self.store.requeue_running(None)
        if requeued:
            log.info("requeued %d job(s) interrupted by a restart: %s", len(requeued), requeued)
        for job in await self.store.unfinished():
            if job.job_state is JobState.delivering:
                self._start_delivery(job)
            else:
                self._spawn(self._notify(job))
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self, delivery_grace_s: float = 30.0) -> None:
        """Stop taking jobs. A delivery under way is allowed to finish: stopping half-way
        would leave stems sent but the job still `delivering`, to be sent again."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=delivery_grace_s)
        for task in list(self._background):
            task.cancel()

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- requests ----------------------------------------------------------------------

    async def submit(self, policy, **fields) -> tuple[Job | None, str | None]:
        """Queue a job if its user and server have a free slot; else say why not."""
        job, refusal = await self.store.admit(policy, **fields)
        if job is not None:
            self.wake()
        return job, refusal

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job. Returns False when it was too late."""
        state = await self.store.request_cancel(job_id)
        if state is None:
            return False
        self.worker.cancel(job_id)
        if self.worker.current_job != job_id:
            # Not on the worker: nobody else will report it.
            await self._ended(await self.store.get(job_id))
        return True

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            job = None if self.paused else await self.store.claim_next(self.config.worker_name)
            if job is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=5.0)
                except TimeoutError:
                    pass
                continue
            try:
                await self._process(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one job must never stop the queue
                log.exception("job %s: unexpected failure", job.id)
                await self._fail(job.id, "something went wrong on our side; please try again", "internal")
            # Jobs behind it moved up one place.
            for queued in await self.store.unfinished():
                if queued.job_state is JobState.queued:
                    self._spawn(self._notify(queued))

    async def _process(self, job: Job) -> None:
        await self._notify(job)
        input_path = self.storage.input_path(job.id, job.source_name)
        try:
            if not input_path.exists():
                size = await self._fetch(job, input_path)
                await self.store.update(job.id, source_size=size)
            digest = await asyncio.to_thread(file_sha256, input_path)
            await self.store.update(job.id, input_sha256=digest)
            if await self._serve_from_cache(await self.store.get(job.id)):
                return
            info = await asyncio.to_thread(probe, input_path, self.config.limits)
            if info.duration_s is not None:
                # Known length: reserve the minutes before any separation work.
                await self.store.reserve(job.id, info.duration_s)
        except InputError as exc:
            await self._fail(job.id, exc.reason, exc.kind)
            return
        if not await self.store.transition(job.id, JobState.decoding):
            await self._settle_cancelled(job.id)
            return
        await self._notify_id(job.id)
        spec = JobSpec(
            job_id=job.id, input_path=str(input_path), stems_dir=str(self.storage.stems_dir(job.id)),
            model=job.model, stems=job.stems, format=job.format,
            mp3_bitrate_kbps=self.config.mp3_bitrate_kbps, attachment_limit=job.attachment_size_limit,
            links_available=self.config.links_available, link_valid_hours=self.config.link_valid_hours,
        )
        refused: list[InputError] = []
        last_write = [0.0]

        async def on_event(event: dict) -> None:
            kind = event["type"]
            moved = True
            if kind == "stage" and event["stage"] == "separating":
                try:
                    # The container did not tell the length: reserve now that it is decoded.
                    await self.store.reserve(job.id, event["duration_s"])
                except InputError as exc:
                    refused.append(exc)
                    self.worker.cancel(job.id)
                    return
                moved = await self.store.transition(job.id, JobState.separating,
                                                    duration_s=event.get("duration_s"))
            elif kind == "stage" and event["stage"] == "encoding":
                moved = await self.store.transition(job.id, JobState.encoding)
            elif kind == "progress":
                now = time.monotonic()
                if now - last_write[0] < self.config.progress_write_interval_s:
                    return
                last_write[0] = now
                await self.store.update(job.id, progress=event["fraction"], heartbeat_at=_now())
            else:
                return
            if not moved:
                self.worker.cancel(job.id)  # cancelled meanwhile
                return
            await self._notify_id(job.id)

        try:
            result = await self.worker.run(spec, on_event)
        except WorkerCrashed as exc:
            current = await self.store.get(job.id)
            log.warning("job %s: %s (attempt %d)", job.id, exc, current.attempts)
            if current.attempts < self.config.max_attempts and current.job_state in (
                    JobState.decoding, JobState.separating, JobState.encoding):
                await self.store.transition(job.id, JobState.queued)
                await self._notify_id(job.id)
            else:
                await self._fail(job.id, "the separation crashed repeatedly on this track", "worker_crashed")
            return
        except StembotError as exc:  # the host could not be (re)started
            await self._fail(job.id, exc.reason, exc.kind)
            return

        if result["type"] == "cancelled" and refused:
            await self._fail(job.id, refused[0].reason, refused[0].kind)
            self.storage.delete(job.id)
        elif result["type"] == "cancelled":
            await self._settle_cancelled(job.id)
        elif result["type"] == "failed":
            await self._fail(job.id, result["reason"], result.get("kind"))
            self.storage.delete(job.id)
        else:
            artifacts = {k: result[k] for k in ("files", "sizes", "format", "mode", "note", "preview")}
            if await self.store.transition(job.id, JobState.delivering, artifacts=artifacts, progress=1.0,
                                           duration_s=result["duration_s"],
                                           separation_s=result["separation_s"]):
                self.storage.delete_input(job.id)
                # Shielded: a shutdown waits for it instead of cutting it off (see stop).
                await asyncio.shield(self._start_delivery(await self.store.get(job.id)))
            else:
                await self._settle_cancelled(job.id)

    async def _fetch(self, job: Job, dest) -> int:
        """Bring the job's input to local disk: attachments and links through the safe
        fetcher, YouTube and SoundCloud through yt-dlp (bounded the same way)."""
        if job.source_kind == "stream":
            from . import ytdl

            return await asyncio.to_thread(ytdl.fetch_media, job.source_url, dest, self.config.limits, enabled=True)
        return await download(job.source_url, dest, self.config.limits.max_input_bytes)

    async def _serve_from_cache(self, job: Job) -> bool:
        """Answer from the stored stems of an earlier, identical request. Not charged."""
        cached = await self.store.find_cached(job)
        if cached is None:
            return False
        source = self.storage.stems_dir(cached.id)
        artifacts = dict(cached.artifacts)
        names = list(artifacts.get("files", {}).values()) + ([artifacts["preview"]] if artifacts.get("preview") else [])
        if not all((source / name).is_file() for name in names):
            return False
        if artifacts.get("mode") == "attach" and not fits(artifacts["sizes"].values(), job.attachment_size_limit):
            if not self.config.links_available:
                return False  # separate again: the delivery plan depends on the limit
            artifacts["mode"] = "links"
            artifacts["note"] = links_note(job.attachment_size_limit, self.config.link_valid_hours)
        target = self.storage.stems_dir(job.id)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            await asyncio.to_thread(_link_or_copy, source / name, target / name)
        if not await self.store.transition(job.id, JobState.delivering, artifacts=artifacts, cache_hit=True,
                                           progress=1.0, duration_s=cached.duration_s, separation_s=0.0):
            await self._settle_cancelled(job.id)
            return True
        log.info("job %s: served from the cache of job %s", job.id, cached.id)
        self.storage.delete_input(job.id)
        await asyncio.shield(self._start_delivery(await self.store.get(job.id)))
        return True

    def _start_delivery(self, job: Job) -> asyncio.Task:
        task = asyncio.create_task(self._deliver(job), name=f"deliver-{job.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        return task

    async def _deliver(self, job: Job) -> None:
        delays = list(self.config.delivery_retry_delays_s)
        while True:
            try:
                await self.notifier.deliver(job)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried, then reported
                if not delays:
                    log.error("job %s: delivery failed for good: %r", job.id, exc)
                    await self._fail(job.id, "the stems were made but could not be sent to Discord",
                                     "delivery_failed")
                    return
                log.warning("job %s: delivery failed (%r); retrying", job.id, exc)
                await asyncio.sleep(delays.pop(0))
        await self.store.transition(job.id, JobState.done, delivered_at=_now())
        self._finish_metrics(await self.store.get(job.id))

    # -- endings -----------------------------------------------------------------------

    async def _fail(self, job_id: int, reason: str, kind: str | None) -> None:
        if await self.store.transition(job_id, JobState.failed, error=reason, error_kind=kind or "error"):
            self.storage.delete_input(job_id)
            await self._ended(await self.store.get(job_id))
        else:
            await self._settle_cancelled(job_id)

    async def _settle_cancelled(self, job_id: int) -> None:
        job = await self.store.get(job_id)
        if job is not None and job.job_state is JobState.cancelled:
            self.storage.delete(job_id)
            await self._ended(job)

    async def _ended(self, job: Job | None) -> None:
        """Count and report a failed or cancelled job, once."""
        if job is None or job.id in self._reported:
            return
        self._reported.add(job.id)
        self._finish_metrics(job)
        try:
            await self.notifier.job_ended(job)
        except Exception:  # noqa: BLE001 - the row already says how it ended
            log.exception("job %s: could not report its end", job.id)

    def _finish_metrics(self, job: Job | None) -> None:
        if self.metrics is None or job is None:
            return
        self.metrics.job_finished(job.state, kind=job.error_kind, separation_s=job.separation_s,
                                  audio_s=job.duration_s if job.job_state is JobState.done else None)

    async def _notify_id(self, job_id: int) -> None:
        job = await self.store.get(job_id)
        if job is not None:
            await self._notify(job)

    async def _notify(self, job: Job) -> None:
        try:
            await self.notifier.job_changed(job)
        except Exception:  # noqa: BLE001 - progress display is best effort
            log.exception("job %s: progress update failed", job.id)


def file_sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _link_or_copy(source, target) -> None:
    import os
    import shutil

    try:
        os.link(source, target)  # same disk: no copy, and each job can be deleted alone
    except OSError:
        shutil.copy2(source, target)


def _now():
    from .db import utcnow

    return utcnow()
