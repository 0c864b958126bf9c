"""Embedded mode's execution backend: jobs run on the bot's own model host, as many at
once as it takes (one on a CPU; on a GPU several, their segments batched)."""

from __future__ import annotations

import asyncio
import logging

from core.host.handle import HostHandle
from core.jobs.dispatcher import AttachedBackend, Dispatcher
from core.jobs.job import Job
from core.jobs.runner import JobRunner, Outcome
from core.storage.local import LocalJobFiles

log = logging.getLogger(__name__)


class EmbeddedExecution(AttachedBackend):
    """Runs each claimed job through a `JobRunner` on `host`. A job is claimed only when
    the host has a free seat for it, so the fair order decides at the last moment."""

    def __init__(self, host: HostHandle):
        self.host = host
        self._runner: JobRunner | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._seats: asyncio.Semaphore | None = None

    @property
    def runner(self) -> JobRunner:
        if self._runner is None:
            raise RuntimeError("not attached to a dispatcher")
        return self._runner

    @property
    def ready(self) -> bool:
        return self.host.ready

    def attach(self, dispatcher: Dispatcher) -> None:
        super().attach(dispatcher)
        self._runner = JobRunner(dispatcher.store, self.host, LocalJobFiles(dispatcher.storage),
                                 dispatcher.config.worker_name, dispatcher.config.run_config())

    async def recover(self) -> None:
        """Jobs this process was running when it stopped go back to the queue."""
        requeued = await self.dispatcher.store.requeue_running(None)
        if requeued:
            log.info("requeued %d job(s) interrupted by a restart: %s", len(requeued), requeued)

    def resumed(self, job: Job) -> None:
        """Nothing to track: the jobs the host was running went back to the queue in `recover`."""

    async def run(self) -> None:
        dispatcher = self.dispatcher
        # One set of seats for the life of the backend: runs started before a restart of
        # this loop still hold theirs.
        if self._seats is None:
            self._seats = asyncio.Semaphore(self.host.capacity)
        seats = self._seats
        while True:
            await seats.acquire()
            try:
                # Not while a dependency is down: the job would run into the outage and fail.
                job = None
                if dispatcher.may_claim():
                    job = await dispatcher.store.claim_next(dispatcher.config.worker_name)
            except Exception as exc:  # noqa: BLE001 - the database may be away for a while
                seats.release()
                await dispatcher.loop_failed(exc)
                continue
            dispatcher.loop_ok()
            if job is None:
                seats.release()
                await dispatcher.idle(5.0)
                continue
            task = asyncio.create_task(self._run_one(job, seats), name=f"job {job.id}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def stop(self) -> None:
        for task in list(self._running):
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass

    async def cancel(self, job_id: int) -> None:
        self.host.cancel(job_id)
        if job_id not in self.host.current_jobs:
            # Not on the host: nobody else will report it.
            await self.dispatcher.ended(await self.dispatcher.store.get(job_id))

    async def withdraw(self, job_id: int, queue_job_id: int | None) -> None:
        self.host.cancel(job_id)  # no-op when the host no longer has it

    async def _run_one(self, job: Job, seats: asyncio.Semaphore) -> None:
        dispatcher = self.dispatcher
        try:
            await dispatcher.or_fail(job.id, self._process(job), "unexpected failure")
        finally:
            seats.release()
        # Jobs behind it moved up one place: those whose message can still show it. (Each
        # place comes from one shared computation, `JobStore.queue_snapshot`.)
        try:
            await dispatcher.show_places(await dispatcher.store.queued_to_show())
        except Exception:  # logged: their places show at the next change
            log.warning("could not show the queue's new places", exc_info=True)

    async def _process(self, job: Job) -> None:
        await self.dispatcher.notify(job)
        async with self.dispatcher.preparing(job):
            if not await self.dispatcher.prepare(job):
                return
        outcome = await self.runner.run(job.id, on_change=self.dispatcher.notify_id)
        await self._after_run(job.id, outcome)

    async def _after_run(self, job_id: int, outcome: Outcome) -> None:
        """Act on how a run ended: deliver, report, or clean up."""
        dispatcher = self.dispatcher
        if outcome is Outcome.delivering:
            await dispatcher.discard_input(job_id)
            # Shielded: a shutdown waits for it instead of cutting it off (Dispatcher.stop).
            await asyncio.shield(dispatcher.start_delivery(await dispatcher.store.require(job_id)))
        elif outcome is Outcome.failed:
            await dispatcher.discard_files(job_id)
            await dispatcher.ended(await dispatcher.store.get(job_id))
        elif outcome in (Outcome.cancelled, Outcome.skipped):
            await dispatcher.settle_cancelled(job_id)
        # Outcome.abandoned: the database is away; the sweeper takes the job back later.
