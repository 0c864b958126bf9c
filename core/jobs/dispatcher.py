"""The dispatcher: takes queued jobs from SQL, runs them on a worker, hands results on.

It lives in the bot's event loop and only awaits: fetching is async I/O and separation
happens in the model host process. Everything it learns goes into the job row first;
the notifier (the Discord side) is told afterwards, so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from core.db import utcnow
from core.errors import InputError
from core.host.handle import HostHandle
from core.jobs.job import Job, JobState
from core.jobs.runner import JobRunner, Outcome, RunConfig
from core.jobs.store import JobStore
from core.media.audio import Limits, probe
from core.media.upload_plan import fits, links_note
from core.net.fetcher import download
from core.storage.local import LocalJobFiles, LocalStorage

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

    def run_config(self) -> RunConfig:
        return RunConfig(max_attempts=self.max_attempts, mp3_bitrate_kbps=self.mp3_bitrate_kbps,
                         links_available=self.links_available, link_valid_hours=self.link_valid_hours,
                         progress_write_interval_s=self.progress_write_interval_s)


class Dispatcher:
    """Embedded mode: jobs run on the bot's own model host (`worker`), as many at once as
    it takes (one on a CPU; on a GPU several, their segments batched)."""

    def __init__(self, store: JobStore, worker: HostHandle | None, storage: LocalStorage, notifier: Notifier,
                 config: DispatcherConfig = DispatcherConfig(), metrics=None):
        self.store = store
        self.worker = worker
        self.runner = None if worker is None else JobRunner(
            store, worker, LocalJobFiles(storage), config.worker_name, config.run_config())
        self.storage = storage
        self.notifier = notifier
        self.config = config
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._reported: set[int] = set()  # jobs whose end was already reported
        self._deliveries: set[asyncio.Task] = set()
        self._running: set[asyncio.Task] = set()
        self.paused = False

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left, then start taking jobs."""
        await self._requeue_interrupted()
        for job in await self.store.unfinished():
            self._resume(job)
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def _requeue_interrupted(self) -> None:
        """Jobs this process was running when it stopped go back to the queue."""
        requeued = await self.store.requeue_running(None)
        if requeued:
            log.info("requeued %d job(s) interrupted by a restart: %s", len(requeued), requeued)

    def _resume(self, job: Job) -> None:
        """Pick up an unfinished job after a start: deliver it, or show where it stands."""
        if job.job_state is JobState.delivering:
            self._start_delivery(job)
        else:
            self._spawn(self._notify(job))

    async def stop(self, delivery_grace_s: float = 30.0) -> None:
        """Stop taking jobs. A delivery under way is allowed to finish: stopping half-way
        would leave stems sent but the job still `delivering`, to be sent again."""
        for task in [self._task, *self._running]:
            if task is None:
                continue
            task.cancel()
            try:
                await task
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
        if job_id not in self.worker.current_jobs:
            # Not on the worker: nobody else will report it.
            await self._ended(await self.store.get(job_id))
        return True

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        # A job is claimed only when the worker has room for it, so the fair order
        # decides at the last moment.
        seats = asyncio.Semaphore(self.worker.capacity)
        while True:
            await seats.acquire()
            job = None if self.paused else await self.store.claim_next(self.config.worker_name)
            if job is None:
                seats.release()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=5.0)
                except TimeoutError:
                    pass
                continue
            task = asyncio.create_task(self._run_one(job, seats), name=f"job {job.id}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_one(self, job: Job, seats: asyncio.Semaphore) -> None:
        try:
            await self._or_fail(job.id, self._process(job), "unexpected failure")
        finally:
            seats.release()
        # Jobs behind it moved up one place.
        for queued in await self.store.unfinished():
            if queued.job_state is JobState.queued:
                self._spawn(self._notify(queued))

    async def _process(self, job: Job) -> None:
        await self._notify(job)
        if not await self._prepare(job):
            return
        outcome = await self.runner.run(job.id, on_change=self._notify_id)
        await self._after_run(job.id, outcome)

    async def _prepare(self, job: Job) -> bool:
        """Bring the input here, answer from the cache when possible, and reserve the
        minutes once the length is known. Returns whether the job goes on to a worker."""
        input_path = self.storage.input_path(job.id, job.source_name)
        try:
            if not input_path.exists():
                size = await self._fetch(job, input_path)
                await self.store.update(job.id, source_size=size)
            digest = await asyncio.to_thread(file_sha256, input_path)
            await self.store.update(job.id, input_sha256=digest)
            if await self._serve_from_cache(await self.store.get(job.id)):
                return False
            info = await asyncio.to_thread(probe, input_path, self.config.limits)
            if info.duration_s is not None:
                # Known length: reserve the minutes before any separation work.
                await self.store.reserve(job.id, info.duration_s)
        except InputError as exc:
            await self._fail(job.id, exc.reason, exc.kind)
            return False
        return True

    async def _after_run(self, job_id: int, outcome: Outcome) -> None:
        """Act on how a run ended: deliver, report, or clean up."""
        if outcome is Outcome.delivering:
            await self.storage.delete_input_async(job_id)
            # Shielded: a shutdown waits for it instead of cutting it off (see stop).
            await asyncio.shield(self._start_delivery(await self.store.get(job_id)))
        elif outcome is Outcome.failed:
            await self.storage.delete_job(job_id)
            await self._ended(await self.store.get(job_id))
        elif outcome in (Outcome.cancelled, Outcome.skipped):
            await self._settle_cancelled(job_id)

    async def _fetch(self, job: Job, dest) -> int:
        """Bring the job's input to local disk: attachments and links through the safe
        fetcher, YouTube and SoundCloud through yt-dlp (bounded the same way)."""
        if job.source_kind == "stream":
            from core.net import ytdl

            return await asyncio.to_thread(ytdl.fetch_media, job.source_url, dest, self.config.limits, enabled=True)
        return await download(job.source_url, dest, self.config.limits.max_input_bytes)

    async def _serve_from_cache(self, job: Job) -> bool:
        """Answer from the stored stems of an earlier, identical request. Not charged."""
        cached = await self.store.find_cached(job)
        if cached is None:
            return False
        artifacts = dict(cached.artifacts)
        names = list(artifacts.get("files", {}).values()) + ([artifacts["preview"]] if artifacts.get("preview") else [])
        if not await self.storage.has_stems(cached.id, names):
            return False
        if artifacts.get("mode") == "attach" and not fits(artifacts["sizes"].values(), job.attachment_size_limit):
            if not self.config.links_available:
                return False  # separate again: the delivery plan depends on the limit
            artifacts["mode"] = "links"
            artifacts["note"] = links_note(job.attachment_size_limit, self.config.link_valid_hours)
        await self.storage.copy_stems(cached.id, job.id, names)
        if not await self.store.transition(job.id, JobState.delivering, artifacts=artifacts, cache_hit=True,
                                           progress=1.0, duration_s=cached.duration_s, separation_s=0.0):
            await self._settle_cancelled(job.id)
            return True
        log.info("job %s: served from the cache of job %s", job.id, cached.id)
        await self.storage.delete_input_async(job.id)
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
        await self.store.transition(job.id, JobState.done, delivered_at=utcnow())
        self._finish_metrics(await self.store.get(job.id))

    # -- endings -----------------------------------------------------------------------

    async def _or_fail(self, job_id: int, step, what: str) -> None:
        """Await `step`; an unexpected error fails the job: one job must never stop the others."""
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: %s", job_id, what)
            await self._fail(job_id, "something went wrong on our side; please try again", "internal")

    async def _fail(self, job_id: int, reason: str, kind: str | None) -> None:
        if await self.store.transition(job_id, JobState.failed, error=reason, error_kind=kind or "error"):
            await self.storage.delete_job(job_id)
            await self._ended(await self.store.get(job_id))
        else:
            await self._settle_cancelled(job_id)

    async def _settle_cancelled(self, job_id: int) -> None:
        job = await self.store.get(job_id)
        if job is not None and job.job_state is JobState.cancelled:
            await self.storage.delete_job(job_id)
            await self._ended(job)

    async def _ended(self, job: Job | None) -> None:
        """Count and report a failed or cancelled job, once."""
        if job is None or job.id in self._reported:
            return
        self._reported.add(job.id)
        self._finish_metrics(job)
        try:
            await self.notifier.job_ended(job)
        except Exception:
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
        except Exception:
            log.exception("job %s: progress update failed", job.id)


def file_sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



class QueueDispatcher(Dispatcher):
    """Distributed mode: the bot prepares each job (fetch, cache, reservation, upload) and
    hands it to `stembot worker`s through the queue; it learns what the workers did from
    the job rows, which it watches.

    Fairness across workers: jobs go to the queue in fair order (`JobStore.claim_next`)
    and only as many as there are ready worker slots, plus `prefetch` prepared ahead so a
    slot that frees up starts its next job at once; the queue never holds a backlog that
    a later request from a waiting server would have to stand behind.
    """

    def __init__(self, store: JobStore, queue, fleet, storage, notifier: Notifier,
                 config: DispatcherConfig = DispatcherConfig(worker_name="bot"), metrics=None,
                 watch_interval_s: float = 0.5, stale_s: float = 30.0, prefetch: int = 1):
        super().__init__(store, None, storage, notifier, config, metrics)
        self.prefetch = prefetch
        self.queue = queue
        self.fleet = fleet
        self.watch_interval_s = watch_interval_s
        self.stale_s = stale_s
        self._preparing: set[int] = set()
        self.ready_slots = 0  # worker slots taking jobs, as of the last look
        self._seen: dict[int, tuple] = {}
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        await super().start()
        self._watcher = asyncio.create_task(self._watch(), name="job-watcher")

    async def _requeue_interrupted(self) -> None:
        """Only jobs the bot was still preparing: jobs with a worker stay theirs."""
        requeued = await self.store.requeue_preparing()
        if requeued:
            log.info("requeued %d job(s) whose preparation a restart interrupted: %s", len(requeued), requeued)

    def _resume(self, job: Job) -> None:
        self._seen[job.id] = _shown(job)
        super()._resume(job)

    async def stop(self, delivery_grace_s: float = 30.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await super().stop(delivery_grace_s)

    async def cancel(self, job_id: int) -> bool:
        if await self.store.request_cancel(job_id) is None:
            return False
        job = await self.store.get(job_id)
        if job is not None and job.queue_job_id is not None:
            await self.queue.abort(job.queue_job_id)  # its worker stops within a segment
        await self._settle_cancelled(job_id)
        return True

    # -- handing jobs to the workers ---------------------------------------------------

    async def _run(self) -> None:
        last_stall_check = last_prune = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - last_stall_check > self.stale_s / 4:
                    last_stall_check = loop.time()
                    await self.queue.retry_stalled(self.stale_s)
                if loop.time() - last_prune > 3600:
                    last_prune = loop.time()
                    await self.queue.forget_old(self.config.link_valid_hours)
                self.ready_slots = await self.fleet.ready_slots()
                if not self.paused:
                    wanted = self.ready_slots + (self.prefetch if self.ready_slots else 0)
                    free = wanted - await self.queue.in_flight() - len(self._preparing)
                    while free > 0:
                        job = await self.store.claim_next(self.config.worker_name)
                        if job is None:
                            break
                        self._preparing.add(job.id)
                        self._spawn(self._hand_over(job))
                        free -= 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not hand jobs to the workers", exc_info=True)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                pass

    async def _hand_over(self, job: Job) -> None:
        try:
            await self._or_fail(job.id, self._enqueue(job), "could not be handed to a worker")
        finally:
            self._preparing.discard(job.id)

    async def _enqueue(self, job: Job) -> None:
        await self._notify(job)
        if not await self._prepare(job):
            return
        transfer = await self.storage.publish_input(job)
        await self.store.update(job.id, transfer=transfer)
        queue_job_id = await self.queue.enqueue(job.id, job.priority)
        if queue_job_id is not None:
            await self.store.update(job.id, queue_job_id=queue_job_id)
        current = await self.store.get(job.id)
        if current.job_state is JobState.cancelled and queue_job_id is not None:
            await self.queue.abort(queue_job_id)  # cancelled while it was being handed over

    # -- watching what the workers do --------------------------------------------------

    async def _watch(self) -> None:
        while True:
            try:
                await self._look()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not read job changes", exc_info=True)
            await asyncio.sleep(self.watch_interval_s)

    async def _look(self) -> None:
        """Tell the notifier what changed since the last look. Reads whole rows, not a
        time cursor: the workers' clocks need not agree with the bot's."""
        current = {job.id: job for job in await self.store.unfinished()}
        queued = JobState.queued.value
        queue_moved = False
        notified: set[int] = set()
        for job_id, job in current.items():
            shown, before = _shown(job), self._seen.get(job_id)
            if shown == before:
                continue
            self._seen[job_id] = shown
            if before is not None and (before[0] == queued) != (shown[0] == queued):
                # It left the queue, or came back (its model host crashed): places moved,
                # and a slot may be free for the next job.
                queue_moved = True
            if job.job_state is JobState.delivering:
                if not any(t.get_name() == f"deliver-{job_id}" for t in self._deliveries):
                    await self.storage.delete_input_async(job_id)
                    self._start_delivery(job)
            else:
                notified.add(job_id)
                self._spawn(self._notify(job))
        for job_id in [j for j in self._seen if j not in current]:
            del self._seen[job_id]
            job = await self.store.get(job_id)
            if job is not None and job.job_state in (JobState.failed, JobState.cancelled):
                await self.storage.delete_job(job_id)
                await self._ended(job)
            queue_moved = True
        if queue_moved:
            self.wake()
            for job in current.values():
                if job.job_state is JobState.queued and job.id not in notified:
                    self._spawn(self._notify(job))


def _shown(job: Job) -> tuple:
    """What of a job the user sees change."""
    return (job.state, round(job.progress or 0.0, 3))
