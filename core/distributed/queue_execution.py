"""Distributed mode's execution backend: the bot prepares each job (fetch, cache,
reservation, upload) and hands it to `stembot worker`s through the job queue, with
presigned URLs for its input and for the exact files it may store, valid while it runs
(`core.jobs.uploads`); it learns what the workers did from the job rows, which it watches.

The bot keeps the quotas: a worker's database role has no right on them. When a worker
found a track's length only by decoding it, the bot reserves the minutes as it sees the
length on the row (refused: the job fails and its worker stops); when a worker ends a job,
the bot settles it (charges or releases the minutes, frees the slot, drops the job's
presigned URLs) before it reports the end.

Fairness across workers: jobs go to the queue in fair order (`JobStore.claim_next`) and
only as many as there are ready worker slots, plus `prefetch` prepared ahead so a slot
that frees up starts its next job at once; the queue never holds a backlog that a later
request from a waiting server would have to stand behind.
"""

from __future__ import annotations

import asyncio
import logging

from core.distributed.fleet import Fleet
from core.distributed.job_watch import HandedOut, JobWatch
from core.distributed.queue import JobQueue
from core.errors import InputError
from core.jobs.dispatcher import AttachedBackend, Dispatcher
from core.jobs.job import Job, JobState
from core.jobs.uploads import TransferWindow, expected_uploads, planned_duration

log = logging.getLogger(__name__)

# What of a job the user sees change: its state and progress.
Shown = tuple[str, float]


class QueueExecution(AttachedBackend):
    """Hands claimed jobs to `stembot worker`s through `queue`, as many as `fleet` has ready
    slots (plus `prefetch`), and turns what the workers write in the job rows into progress,
    deliveries and endings."""

    def __init__(self, queue: JobQueue, fleet: Fleet, watch_interval_s: float = 0.5, stale_s: float = 30.0,
                 prefetch: int = 1, window: TransferWindow | None = None):
        self.queue = queue
        self.window = window or TransferWindow()
        self.fleet = fleet
        self.watch_interval_s = watch_interval_s
        self.stale_s = stale_s
        self.prefetch = prefetch
        self.ready_slots = 0  # worker slots taking jobs, as of the last look
        self._preparing: set[int] = set()
        self._seen: dict[int, Shown] = {}  # of the jobs handed out
        self._ending: set[int] = set()  # jobs that left the watch, their end not yet handled
        self._rows: JobWatch | None = None  # set by attach
        self._watcher: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.ready_slots > 0

    def attach(self, dispatcher: Dispatcher) -> None:
        super().attach(dispatcher)
        self._rows = JobWatch(dispatcher.store.sessions)

    @property
    def _watch_rows(self) -> JobWatch:
        if self._rows is None:
            raise RuntimeError("not attached to a dispatcher")
        return self._rows

    async def recover(self) -> None:
        """Only jobs the bot was still preparing: jobs with a worker stay theirs."""
        self._watch_rows.starting()
        requeued = await self.dispatcher.store.requeue_preparing()
        if requeued:
            log.info("requeued %d job(s) whose preparation a restart interrupted: %s", len(requeued), requeued)

    def resumed(self, job: Job) -> None:
        self._watch_rows.know(job.id, job.job_state)
        if not job.is_final and job.job_state is not JobState.queued:
            self._seen[job.id] = _shown(job)

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def cancel(self, job_id: int) -> None:
        job = await self.dispatcher.store.get(job_id)
        if job is not None and job.queue_job_id is not None:
            await self.queue.abort(job.queue_job_id)  # its worker stops within a segment
        await self.dispatcher.settle_cancelled(job_id)

    # -- handing jobs to the workers ---------------------------------------------------

    async def run(self) -> None:
        """Hand jobs over as slots free up; meanwhile watch the rows of those handed over."""
        self._watcher = asyncio.create_task(self._watch(), name="job-watcher")
        dispatcher = self.dispatcher
        last_stall_check = last_prune = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - last_stall_check > self.stale_s / 4:
                    last_stall_check = loop.time()
                    await self.queue.retry_stalled(self.stale_s)
                if loop.time() - last_prune > 3600:
                    last_prune = loop.time()
                    await self.queue.forget_old(dispatcher.config.link_valid_hours)
                    await self.fleet.forget_stale()  # workers gone for an hour: off /stembot workers
                self.ready_slots = await self.fleet.ready_slots()
                if dispatcher.may_claim():
                    wanted = self.ready_slots + (self.prefetch if self.ready_slots else 0)
                    free = wanted - await self.queue.in_flight() - len(self._preparing)
                    while free > 0:
                        job = await dispatcher.store.claim_next(dispatcher.config.worker_name)
                        if job is None:
                            break
                        self._preparing.add(job.id)
                        dispatcher.spawn(self._hand_over(job))
                        free -= 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be away for a while
                await dispatcher.loop_failed(exc)
                continue
            dispatcher.loop_ok()
            await dispatcher.idle(1.0)

    async def withdraw(self, job_id: int, queue_job_id: int | None) -> None:
        if queue_job_id is not None:
            # Its worker (hung, or cut off from the database) stops within a segment, and the
            # queue's lock on the job is free for the next run.
            await self.queue.abort(queue_job_id)

    async def _hand_over(self, job: Job) -> None:
        try:
            async with self.dispatcher.preparing(job):
                await self.dispatcher.or_fail(job.id, self._enqueue(job), "could not be handed to a worker")
        finally:
            self._preparing.discard(job.id)

    async def _enqueue(self, job: Job) -> None:
        dispatcher = self.dispatcher
        await dispatcher.notify(job)
        if not await dispatcher.prepare(job):
            return
        # Upload policies for the exact files this job can make, ending with its run.
        job = await dispatcher.store.require(job.id)
        longest = dispatcher.config.limits.max_duration_s
        duration = planned_duration(job, longest)
        transfer = await dispatcher.storage.publish_input(
            job, expected_uploads(job, duration),
            self.window.seconds(duration, longest, dispatcher.config.max_attempts))
        await dispatcher.store.update(job.id, transfer=transfer)
        queue_job_id = await self.queue.enqueue(job.id, job.priority)
        if queue_job_id is not None:
            await dispatcher.store.update(job.id, queue_job_id=queue_job_id)
        current = await dispatcher.store.require(job.id)
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
        """Tell the notifier what changed since the last look. Reads the rows of the jobs
        handed to workers and the queue's membership (`JobWatch`), not every queued row, and
        compares values, not a time cursor: the workers' clocks need not agree with the bot's."""
        dispatcher = self.dispatcher
        store = dispatcher.store
        found = await self._watch_rows.look()
        # Jobs that left the watch other than to the queue may have ended: kept until handled,
        # so that a database error in this look only puts their report off to the next one.
        for job_id in [*found.left, *found.dequeued]:
            self._seen.pop(job_id, None)
            if found.left.get(job_id) != JobState.queued.value:  # if it did, it is shown below
                self._ending.add(job_id)
        # A job that left the queue for a worker, or came back (its model host crashed),
        # or ended while queued: places moved, and a slot may be free for the next job.
        queue_moved = bool(found.claimed or found.enqueued or found.dequeued or found.left)
        changed: dict[int, Shown] = {}
        for row in found.handed_out:
            if _length_found_by_worker(row) and not await self._reserve(row):
                continue
            shown = _shown(row)
            if shown != self._seen.get(row.id):
                changed[row.id] = shown
        notified: set[int] = set()
        for job in await self._watch_rows.full_rows(changed.keys() | found.enqueued):
            if job.id in changed:
                self._seen[job.id] = changed[job.id]
            if job.job_state is JobState.delivering:
                if not dispatcher.delivery_under_way(job.id):
                    dispatcher.start_delivery(job)
                    dispatcher.spawn(dispatcher.discard_input(job.id))
            elif not job.is_final:
                notified.add(job.id)
                dispatcher.spawn(dispatcher.notify(job))
        for job_id in sorted(self._ending):
            gone = await store.get(job_id)
            if gone is not None and gone.is_final:
                await store.settle(job_id)  # a worker (or an operator) may have ended it
                gone = await store.get(job_id)
            if gone is not None and gone.job_state in (JobState.failed, JobState.cancelled):
                await dispatcher.discard_files(job_id)
                await dispatcher.ended(gone)
            self._ending.discard(job_id)
        if queue_moved:
            dispatcher.wake()
            # Only messages that can still be edited show their new place.
            await dispatcher.show_places(job for job in await store.queued_to_show() if job.id not in notified)

    async def _reserve(self, job: HandedOut) -> bool:
        """Reserve the minutes of a track whose length its worker found; refused, fail the
        job and stop its worker. Returns whether the job goes on."""
        assert job.duration_s is not None  # see _length_found_by_worker
        try:
            await self.dispatcher.store.reserve(job.id, job.duration_s)
        except InputError as exc:
            await self.dispatcher.fail(job.id, exc.reason, exc.kind)
            if job.queue_job_id is not None:
                await self.queue.abort(job.queue_job_id)
            return False
        return True


def _length_found_by_worker(job: HandedOut) -> bool:
    """A job a worker decoded without the bot knowing its length: no minutes reserved yet."""
    return (job.quota_state == "none" and job.duration_s is not None and bool(job.limits) and not job.cache_hit
            and job.job_state in (JobState.separating, JobState.encoding, JobState.delivering))


def _shown(job: Job | HandedOut) -> Shown:
    return (job.state, round(job.progress or 0.0, 3))
