"""`stembot worker`: takes jobs from the queue and runs them on this host's devices.

One slot per device (GPU, or the CPU): each slot has its own model host process and its
own procrastinate worker with `concurrency=1`, so a GPU never runs two jobs at once.
The slots heartbeat in `worker_slots` (the bot hands out only as many jobs as there are
ready slots) and through procrastinate (a slot that stops beating has its job retried
by another worker). SIGTERM drains: the slots take no new job, finish the one they run,
then stop. A user's cancel aborts the running job within a segment.

Workers hold no storage credentials: they read the input and write the stems through
the presigned URLs the bot put in the job row (`core.storage.transfer`), one POST per
file the bot expects, each for its exact key and size.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import procrastinate

from core.db import head_revision, known_revisions, schema_revision
from core.distributed.fleet import Fleet
from core.distributed.queue import QUEUE, JobQueue, make_app
from core.distributed.queue_schema import schema_installed
from core.errors import StembotError
from core.host.handle import HostHandle
from core.jobs.job import Job
from core.jobs.runner import JobRunner, Outcome
from core.jobs.store import JobStore
from core.outages import DEFAULT_BUDGET_S, DependencyDown, Outage, retry_transient
from core.runtime import Runtime
from core.settings import Settings
from core.storage.local import LocalJobFiles, LocalStorage
from core.storage.transfer import TransferError, download, is_transient, upload

log = logging.getLogger(__name__)

T = TypeVar("T")


class StorageUnreachable(StembotError):
    kind = "storage"


class StorageOutage(StembotError):
    kind = "outage"


def outage_message(what: str, budget_s: float) -> str:
    return (f"the storage could not be reached for {budget_s / 60:.0f} min while {what}; "
            "nothing was charged, please try again later")


class RemoteJobFiles:
    """A run's files on a worker: the input downloaded, the stems uploaded, through the
    job's presigned URLs; or in place, when bot and worker share a disk (no object store)."""

    def __init__(self, work_dir: Path, shared_root: Path, max_input_bytes: int,
                 transient_retry_s: float = DEFAULT_BUDGET_S):
        self.work_dir = Path(work_dir)
        self.max_input_bytes = max_input_bytes
        self.shared = LocalJobFiles(LocalStorage(shared_root))
        # A transfer that meets an outage of the store waits for it (the job keeps this
        # slot) for up to this long, rather than failing at once.
        self.transient_retry_s = transient_retry_s
        self.outage = Outage("the object store")

    async def _transfer_through_outages(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        try:
            return await retry_transient(call, transient=is_transient, budget_s=self.transient_retry_s,
                                         outage=self.outage)
        except DependencyDown as exc:
            raise StorageOutage(outage_message(what, self.transient_retry_s)) from exc

    @staticmethod
    def _transfer(job: Job) -> dict[str, Any] | None:
        """The job's presigned URLs; None when bot and worker share a disk."""
        return job.transfer if job.transfer and job.transfer.get("input_url") else None

    async def input_file(self, job: Job) -> Path:
        transfer = self._transfer(job)
        if transfer is None:
            return await self.shared.input_file(job)
        dest = self.work_dir / str(job.id) / f"input{transfer.get('input_suffix', '')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._transfer_through_outages(
                lambda: download(transfer["input_url"], dest, self.max_input_bytes), "reading the track")
        except TransferError as exc:
            raise StorageUnreachable(f"the worker could not read the track from storage ({exc})") from exc
        return dest

    def stems_dir(self, job: Job) -> Path:
        if self._transfer(job) is None:
            return self.shared.stems_dir(job)
        return self.work_dir / str(job.id) / "stems"

    async def publish(self, job: Job, artifacts: dict) -> None:
        transfer = self._transfer(job)
        if transfer is None:
            return
        names = list(artifacts.get("files", {}).values())
        if artifacts.get("preview"):
            names.append(artifacts["preview"])
        folder = self.stems_dir(job)
        # One upload policy per file the bot expects, for that exact key: a file it did not
        # expect (a model with other stems) has none, and the job fails saying so.
        posts = transfer.get("stems_posts")
        if not isinstance(posts, dict):
            raise StorageUnreachable("the bot gave no upload policy per file (is it another version of stembot?)")
        unexpected = [name for name in names if name not in posts]
        if unexpected:
            raise StorageUnreachable(f"the bot takes no file named {', '.join(unexpected)[:200]} for this job")
        try:
            for name in names:
                await self._transfer_through_outages(functools.partial(upload, posts[name], folder / name),
                                                     "storing the stems")
        except TransferError as exc:
            raise StorageUnreachable(f"the worker could not store the stems ({exc})") from exc

    async def discard(self, job: Job) -> None:
        await asyncio.to_thread(shutil.rmtree, self.work_dir / str(job.id), True)


def default_devices(device: str) -> list[str]:
    """Every visible GPU, one slot each; else one CPU slot."""
    if device == "cpu":
        return ["cpu"]
    import torch  # noqa: PLC0415 - loads for seconds; a worker told to use the CPU never needs it

    count = torch.cuda.device_count()
    if count == 0:
        if device == "cuda":
            raise StembotError("STEMBOT_DEVICE=cuda but no CUDA device is visible")
        return ["cpu"]
    return [f"cuda:{i}" for i in range(count)]


@dataclass
class Slot:
    name: str
    device: str
    host: HostHandle
    runner: JobRunner
    job_ids: set[int] = field(default_factory=set)

    @property
    def job_id(self) -> int | None:
        """One running job, for the slot's row (None: idle)."""
        return min(self.job_ids) if self.job_ids else None


class QueueWorker:
    def __init__(self, settings: Settings, name: str | None = None, devices: list[str] | None = None,
                 heartbeat_s: float = 5.0, stale_s: float | None = None):
        self.settings = settings
        self.name = (name or settings.worker_name or f"{socket.gethostname()}-{os.getpid()}")[:48]
        self.devices = devices or default_devices(settings.device)
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s or settings.worker_stale_s
        self.slots: list[Slot] = []
        self.draining = False
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Drain: take no new job, finish the running ones, then return from `run`."""
        self._stop.set()

    async def run(self) -> None:
        settings = self.settings
        url = settings.resolved_database_url
        if not await schema_installed(url):
            raise StembotError("the job queue's tables are missing: run `stembot db upgrade` first")
        runtime = Runtime.from_settings(settings)
        await _check_schema(runtime)
        # No QuotaBook: a worker's database role has no right on the quota tables. It only
        # checks a track's length against the job's limits; the bot reserves the minutes and
        # settles the jobs a worker ends (core.distributed.queue_execution).
        store = JobStore(runtime.sessions)
        fleet = Fleet(runtime.sessions, self.stale_s)
        files = RemoteJobFiles(Path(settings.data_dir) / "worker" / self.name, Path(settings.data_dir) / "jobs",
                               settings.max_input_bytes, settings.transient_retry_s)
        run_config = runtime.run_config(progress_write_interval_s=min(2.0, self.heartbeat_s))
        for device, config in zip(self.devices, runtime.slot_host_configs(self.devices), strict=True):
            host = HostHandle(config, deadline=runtime.deadline())
            name = f"{self.name}/{device}"[:64]
            self.slots.append(Slot(name=name, device=device, host=host,
                                   runner=JobRunner(store, host, files, name, run_config)))
        app = make_app(url)
        beats = None
        try:
            for slot in self.slots:
                await self._beat(fleet, slot, "starting")
            # Load the models side by side (one per device), then start taking jobs.
            await asyncio.gather(*(slot.host.start() for slot in self.slots))
            async with app.open_async():
                tasks: list[asyncio.Task[None]] = []
                for slot in self.slots:
                    task = asyncio.create_task(app.run_worker_async(
                        queues=[QUEUE], name=slot.name, concurrency=slot.host.capacity, wait=True,
                        additional_context={"run": self._runner_of(slot)},
                        install_signal_handlers=False, listen_notify=True,
                        # LISTEN/NOTIFY wakes a slot at once; the poll covers a notification
                        # missed while the listener was (re)connecting.
                        fetch_job_polling_interval=1.0, abort_job_polling_interval=1.0,
                        update_heartbeat_interval=self.heartbeat_s, stalled_worker_timeout=self.stale_s,
                        delete_jobs="never",  # kept for a while (history, timings); the bot prunes them
                    ), name=f"slot {slot.name}")
                    tasks.append(task)
                    await self._beat(fleet, slot, "ready")
                log.info("worker %s ready: %s", self.name, ", ".join(s.device for s in self.slots))
                beats = asyncio.create_task(self._heartbeats(fleet, app))
                stop = asyncio.create_task(self._stop.wait())
                await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                self.draining = True
                for slot, task in zip(self.slots, tasks, strict=True):
                    await self._beat(fleet, slot, "draining")
                    if slot.job_ids:
                        log.info("draining: waiting for job(s) %s on %s", sorted(slot.job_ids), slot.device)
                    # Cancelling procrastinate's worker stops it taking jobs and waits
                    # for the running one to finish (no graceful time-out is set).
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for slot, result in zip(self.slots, results, strict=True):
                    if isinstance(result, Exception):
                        log.error("slot %s stopped with %r", slot.name, result)
        finally:
            if beats is not None:
                beats.cancel()
            for slot in self.slots:
                await slot.host.stop()
                try:
                    await fleet.leave(slot.name)
                except Exception:
                    log.warning("could not remove slot %s", slot.name, exc_info=True)
            await runtime.close()

    def _runner_of(self, slot: Slot) -> Callable[[int], Awaitable[Outcome]]:
        async def run(job_id: int) -> Outcome:
            slot.job_ids.add(job_id)
            try:
                outcome = await slot.runner.run(job_id)
                log.info("job %s on %s: %s", job_id, slot.device, outcome.value)
                return outcome
            except asyncio.CancelledError:
                log.info("job %s on %s: aborted", job_id, slot.device)
                raise
            finally:
                slot.job_ids.discard(job_id)
        return run

    async def _beat(self, fleet: Fleet, slot: Slot, state: str) -> None:
        await fleet.beat(slot.name, host=socket.gethostname()[:255], pid=os.getpid(), device=slot.device,
                         model=self.settings.model, state=state, job_id=slot.job_id,
                         capacity=slot.host.capacity)

    async def _heartbeats(self, fleet: Fleet, app: procrastinate.App) -> None:
        """Refresh the slots' rows, and take over the jobs of workers that stopped beating
        (every worker does this, so recovery needs no bot)."""
        queue = JobQueue(app=app)
        while True:
            for slot in self.slots:
                try:
                    alive = slot.host.alive() or slot.job_id is None
                    await self._beat(fleet, slot, "draining" if self.draining else ("ready" if alive else "starting"))
                except Exception:
                    log.warning("heartbeat of %s failed", slot.name, exc_info=True)
            try:
                await queue.retry_stalled(self.stale_s)
            except Exception:
                log.warning("could not check for stalled jobs", exc_info=True)
            await asyncio.sleep(self.heartbeat_s)


async def _check_schema(runtime: Runtime) -> None:
    """Refuse to take jobs on a schema other than this code's: a worker older or newer than
    the bot's database would take a job and then fail it on a missing column."""
    found, head = await schema_revision(runtime.engine), head_revision()
    if found == head:
        return
    if found is None or found in known_revisions():
        raise StembotError(f"the database's schema is at revision {found or 'none'}, but this worker needs {head}: "
                           "run `stembot db upgrade` (or upgrade and restart the bot) first")
    raise StembotError(f"the database's schema is at revision {found}, newer than this worker knows ({head}): "
                       "upgrade stembot on this worker to the bot's version")

