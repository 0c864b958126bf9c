"""The dispatcher: takes queued jobs from SQL, has them run, hands results on.

It lives in the bot's event loop and only awaits: fetching is async I/O and separation
happens in a model host process. Everything it learns goes into the job row first;
the notifier (the Discord side) is told afterwards, so a restart loses nothing.

Where the jobs run is its execution backend's business: the bot's own model host
(`core.jobs.embedded_execution`) or `stembot worker`s behind the job queue
(`core.distributed.queue_execution`). The steps around a run are the same for both and
are here: preparing a job (fetch, hash, cache, probe, reserve), delivering it with
retries, failing it, settling a cancelled one, reporting each end once, and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from core.db import as_utc, utcnow
from core.errors import InputError, LowDiskError
from core.jobs.heartbeat import heartbeat
from core.jobs.job import UNANSWERED, UNANSWERED_ERROR, Job, JobState, Lease
from core.jobs.quotas import Policy
from core.jobs.recent import RecentKeys
from core.jobs.results import RESULTS_REFUSED, ResultsRefused, check_artifacts
from core.jobs.runner import RunConfig
from core.jobs.store import JobStore, Recovered
from core.jobs.write_retry import DATABASE_ERRORS, WriteAbandoned, retry_write
from core.media.audio import Limits, probe
from core.media.upload_plan import fits, links_note
from core.net import ytdl
from core.net.fetcher import SourceRules, download
from core.outages import DEFAULT_BUDGET_S, DependencyDown, Outage, network_error, retry_transient
from core.storage.file_digest import file_sha256
from core.storage.local import LocalStorage

log = logging.getLogger(__name__)

# After a failed round of the dispatch loop (the database away, say), the next waits this
# long, doubling per failure up to the maximum, with jitter so that restarted bots and
# workers do not all come back at once.
# A track being split holds its mix and every stem as 32-bit float samples (44.1 kHz stereo,
# up to 6 stems) beside the encoded files: about 2.5 MB per second of audio.
STAGING_BYTES_PER_SECOND = 44_100 * 2 * 4 * 7
LOW_DISK = "the bot is short of disk space right now, so it takes no new songs; please try again later"
LOW_DISK_FOR_TRACK = "the bot is short of disk space for a track this long right now; please try again later"
LOOP_RETRY_BASE_S = 1.0
LOOP_RETRY_MAX_S = 30.0
# At start, the ends of jobs left untold are told if they ended this recently; older ones
# are past caring about (and past the stored files' retention).
TELL_ENDINGS_WITHIN = timedelta(days=1)
# What a user reads when a dependency stayed away for the whole retry budget.
STORAGE_OUTAGE = "the storage stayed unreachable for {minutes} min; nothing was charged, please try again later"
DISCORD_OUTAGE = ("the stems were made but Discord would not take them for {minutes} min; "
                  "nothing was charged, please try again later")
# Job ends remembered as told, beyond the row's notified_at (see Dispatcher.ended).
RECENT_ENDS_KEPT = 100
# Deliveries a database error cut short that one pass of the sweeper starts again, at most
# (Dispatcher.resume_deliveries); the others wait for the next pass.
RESUMED_PER_PASS = 20
# Jobs whose results went out but whose end could not be written (the database away),
# remembered so that only that write is done again, never the sending (bounded: the bot
# runs for months; far more than a database outage leaves).
SENT_KEPT = 10_000


class JobMetrics(Protocol):
    """Where the dispatcher counts finished jobs (core.ops.web.Metrics, for Prometheus)."""

    def job_finished(self, state: str, kind: str | None = None, separation_s: float | None = None,
                     audio_s: float | None = None) -> None: ...


class Notifier(Protocol):
    """What the dispatcher tells the outside world. Implemented by the bot."""

    async def job_changed(self, job: Job) -> None:
        """State, progress or queue position changed (callers throttle their edits)."""

    async def deliver(self, job: Job) -> None:
        """Send the results of a job in `delivering`, from the files that
        `core.jobs.results.open_checked` checked. Raise to have it retried; raise
        ResultsRefused (from that check) to have the job failed at once."""

    async def job_ended(self, job: Job) -> None:
        """The job failed or was cancelled; `job.error` says why."""


class ExecutionBackend(Protocol):
    """Where and how the dispatcher's jobs run. It takes claimed jobs through the
    dispatcher's shared steps (`Dispatcher.prepare`, `start_delivery`, `fail`, ...)."""

    @property
    def ready(self) -> bool:
        """Whether a model is loaded somewhere to run jobs."""

    def attach(self, dispatcher: Dispatcher) -> None:
        """Called once by the dispatcher this backend serves, before anything else."""

    async def recover(self) -> None:
        """At start: put back in the queue the jobs a previous run left half-way."""

    def resumed(self, job: Job) -> None:
        """At start: `job`, unfinished, is being picked up where it stands."""

    async def run(self) -> None:
        """Claim jobs and have them run, until cancelled."""

    async def stop(self) -> None:
        """Stop what `run` started beside itself (runs, watchers)."""

    async def cancel(self, job_id: int) -> None:
        """Stop job `job_id`, whose cancel the store accepted, and see its end reported."""

    async def withdraw(self, job_id: int, queue_job_id: int | None) -> None:
        """Stop whatever may still run of job `job_id`, which the sweeper took back from a
        run that stopped heartbeating (`JobStore.recover_stale`)."""


# Status messages redrawn per turn of the event loop when the queue moves (`show_places`).
PLACES_PER_STEP = 50


class AttachedBackend:
    """What every execution backend shares: the dispatcher it serves, set by `attach`."""

    _dispatcher: Dispatcher | None = None

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeError("not attached to a dispatcher")
        return self._dispatcher

    def attach(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher


@dataclass
class DispatcherConfig:
    worker_name: str = "local"
    max_attempts: int = 3
    limits: Limits = Limits()
    mp3_bitrate_kbps: int = 320
    links_available: bool = False
    link_valid_hours: float = 24.0
    progress_write_interval_s: float = 2.0
    # A delivery or a storage call meeting an outage is tried again for this long (core.outages).
    transient_retry_s: float = DEFAULT_BUDGET_S
    stale_s: float = 300.0  # see RunConfig.stale_s (STEMBOT_JOB_STALE_S)
    min_free_bytes: int = 0  # new jobs are refused below this much free space (0: no check)
    stages_here: bool = True  # whether jobs are split on this machine's disk (embedded mode)
    # Attachments from the Discord CDN origins only, links from public sites (and allowed networks).
    fetch_rules: SourceRules = field(default_factory=SourceRules)

    def run_config(self) -> RunConfig:
        return RunConfig(max_attempts=self.max_attempts, mp3_bitrate_kbps=self.mp3_bitrate_kbps,
                         links_available=self.links_available, link_valid_hours=self.link_valid_hours,
                         progress_write_interval_s=self.progress_write_interval_s, stale_s=self.stale_s)


class Dispatcher:
    """Takes jobs from the store to `execution` and their results to the notifier."""

    def __init__(self, store: JobStore, storage: LocalStorage, notifier: Notifier, execution: ExecutionBackend,
                 config: DispatcherConfig | None = None, metrics: JobMetrics | None = None,
                 transient: Callable[[BaseException], bool] = network_error):
        """`transient(exc)`: whether an error the notifier raised may go away if tried again
        (its service answering 5xx, a connection refused or reset, a timeout)."""
        self.store = store
        self.storage = storage
        self.notifier = notifier
        self.config = config or DispatcherConfig()
        self.metrics = metrics
        self.execution = execution
        self.transient = transient
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Ends are told once: (job, when it ended), so a job an operator retried (`stembot
        # jobs retry`) has its next end told too. The row's notified_at says an end was told;
        # in memory only the ends being told now and the last few told (against a row read
        # before the telling) are kept, so that this does not grow with every job ever run.
        self._reporting: set[tuple[int, datetime | None]] = set()
        self._told: RecentKeys[tuple[int, datetime | None]] = RecentKeys(RECENT_ENDS_KEPT)
        self._deliveries: dict[int, asyncio.Task[None]] = {}  # by job id: one per job at a time
        self._sent: RecentKeys[int] = RecentKeys(SENT_KEPT)
        self.paused = False
        self.loop_error: str | None = None  # why the dispatch loop's last round failed
        self._loop_failures = 0
        # Deliveries waiting on Discord; with the storage's own, what holds new jobs back.
        self.discord_outage = Outage("Discord")
        self.outages = (*storage.outages, self.discord_outage)
        execution.attach(self)

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left, then start taking jobs."""
        await self.execution.recover()
        for job in await self.store.unfinished():
            self.execution.resumed(job)
            self._resume(job)
        self.spawn(self._tell_untold_endings())
        self._task = asyncio.create_task(self._supervise(), name="dispatcher")

    async def _supervise(self) -> None:
        """Run the backend's loop; should it ever end on an error, start it again after a
        pause: a dispatcher that stops taking jobs would leave every user waiting."""
        while True:
            try:
                await self.execution.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - noted for /readyz, logged, and run again
                await self.loop_failed(exc)

    def _resume(self, job: Job) -> None:
        """Pick up an unfinished job after a start: deliver it, or show where it stands."""
        if job.job_state is JobState.delivering:
            self.start_delivery(job)
        else:
            self.spawn(self.notify(job))

    async def _tell_untold_endings(self) -> None:
        """Report, once, the failed and cancelled jobs whose user was never told (the end
        came while the bot was down, or it stopped before telling)."""
        try:
            untold = await self.store.untold_endings(since=utcnow() - TELL_ENDINGS_WITHIN)
        except Exception:
            log.exception("could not look for job endings left untold")
            return
        for job in untold:
            await self.discard_files(job.id)
            await self.ended(job)

    async def stop(self, delivery_grace_s: float = 30.0) -> None:
        """Stop taking jobs. A delivery under way is allowed to finish: stopping half-way
        would leave stems sent but the job still `delivering`, to be sent again."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        await self.execution.stop()
        if self._deliveries:
            await asyncio.wait(self._deliveries.values(), timeout=delivery_grace_s)
        for task in list(self._background):
            task.cancel()

    @property
    def ready(self) -> bool:
        """Whether a model is loaded somewhere to run jobs (shown in queue messages)."""
        return self.execution.ready

    @property
    def dispatching(self) -> bool:
        """Whether the dispatch loop runs and its last round went through (for /readyz)."""
        return self._task is not None and not self._task.done() and self.loop_error is None

    def loop_ok(self) -> None:
        """A round of the dispatch loop went through."""
        if self.loop_error is not None:
            log.info("the dispatch loop works again")
        self.loop_error = None
        self._loop_failures = 0

    async def loop_failed(self, exc: BaseException) -> None:
        """A round of the dispatch loop failed: note why for /readyz, then wait, longer
        after each failure in a row, before the next round."""
        self._loop_failures += 1
        self.loop_error = type(exc).__name__
        log.warning("the dispatch loop failed (%d in a row); trying again", self._loop_failures, exc_info=exc)
        delay = min(LOOP_RETRY_MAX_S, LOOP_RETRY_BASE_S * 2 ** (self._loop_failures - 1))
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    @property
    def held_back(self) -> Outage | None:
        """A dependency that calls are waiting on right now: while there is one, no new job
        is started, since it would only run into the same outage and fail."""
        return next((outage for outage in self.outages if outage.down), None)

    def may_claim(self) -> bool:
        """Whether the backend may start another job now."""
        return not self.paused and self.held_back is None

    def wake(self) -> None:
        """Have the backend look for jobs now (one was queued, or a place freed up)."""
        self._wake.set()

    async def idle(self, timeout_s: float) -> None:
        """Wait until woken, or `timeout_s` at most."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=timeout_s)
        except TimeoutError:
            pass

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background; a stop cancels it."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- requests ----------------------------------------------------------------------

    async def submit(self, policy: Policy, **fields: Any) -> tuple[Job | None, str | None]:
        """Queue a job if its user and server have a free slot; else say why not."""
        free = self.free_bytes() if self.config.min_free_bytes else None
        if free is not None and free < self.config.min_free_bytes:
            log.warning("refusing a new job: %d MB free in %s, below the %d MB kept free",
                        free // 2**20, self.storage.root, self.config.min_free_bytes // 2**20)
            return None, LOW_DISK
        job, refusal = await self.store.admit(policy, **fields)
        if job is not None:
            self.wake()
        return job, refusal

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job. Returns False when it was too late."""
        if await self.store.request_cancel(job_id) is None:
            return False
        await self.execution.cancel(job_id)
        return True

    async def cancel_unanswered(self, job_id: int) -> bool:
        """Cancel a queued job whose request was never answered in the chat (the bot stopped
        between admitting it and acknowledging it, and the chat no longer takes an answer):
        its slot and minutes are released, and its user is told to send it again (the
        notifier knows it by `UNANSWERED`). False when it had moved on meanwhile."""
        if not await self.store.transition(job_id, JobState.cancelled, error=UNANSWERED_ERROR,
                                           error_kind=UNANSWERED):
            return False
        log.warning("job %s: its request was never answered before a restart; cancelled", job_id)
        await self.storage.delete_job(job_id)
        await self.ended(await self.store.get(job_id))
        return True

    async def fail_by_operator(self, job_id: int, reason: str) -> bool:
        """The bot's owner ends an unfinished job: failed with `reason` (slot and minutes
        released), its run stopped, its files deleted, its user told. False when it had
        ended meanwhile."""
        if not await self.store.fail_by_operator(job_id, reason):
            return False
        await self.execution.cancel(job_id)  # a run under way stops; the failed row stays failed
        await self.storage.delete_job(job_id)
        await self.ended(await self.store.get(job_id))
        return True

    # -- the steps around a run ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def preparing(self, job: Job) -> AsyncIterator[None]:
        """Write the heartbeat of a job the bot prepares (`fetching`) every stale_s / 4 while
        the body runs: a long download is not a stuck job, and a preparation that a database
        error cut short is (the sweeper takes it back once the heartbeat is stale)."""
        lease = Lease(self.config.worker_name, job.attempts)
        async with heartbeat(self.store, job.id, lease, self.config.stale_s / 4, in_state=JobState.fetching):
            yield

    async def prepare(self, job: Job) -> bool:
        """Bring the input here, answer from the cache when possible, and reserve the
        minutes once the length is known. Returns whether the job goes on to a run."""
        input_path = self.storage.input_path(job.id, job.source_name)
        try:
            if not input_path.exists():
                size = await self._fetch(job, input_path)
                await self.store.update(job.id, source_size=size)
            digest = await asyncio.to_thread(file_sha256, input_path)
            await self.store.update(job.id, input_sha256=digest)
            if await self._serve_from_cache(await self.store.require(job.id)):
                return False
            info = await asyncio.to_thread(probe, input_path, self.config.limits)
            if self.config.stages_here and info.duration_s is not None:
                self._check_room_to_stage(info.duration_s)
            if info.duration_s is not None:
                # Known length: reserve the minutes before any separation work.
                await self.store.reserve(job.id, info.duration_s)
        except InputError as exc:
            await self.fail(job.id, exc.reason, exc.kind)
            return False
        return True

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.storage.root).free

    def _check_room_to_stage(self, duration_s: float) -> None:
        """Refuse a track whose split would not fit on this disk beside the space kept free."""
        needed = int(duration_s * STAGING_BYTES_PER_SECOND) + self.config.min_free_bytes
        free = self.free_bytes()
        if free < needed:
            log.warning("refusing a %.0f s track: %d MB free, %d MB needed to split it",
                        duration_s, free // 2**20, needed // 2**20)
            raise LowDiskError(LOW_DISK_FOR_TRACK)

    async def _fetch(self, job: Job, dest: Path) -> int:
        """Bring the job's input to local disk: attachments and links through the safe
        fetcher, each under its own rules, YouTube and SoundCloud through yt-dlp (bounded
        the same way, under a link's rules)."""
        rules = self.config.fetch_rules.for_kind(job.source_kind)
        if job.source_kind == "stream":
            return await asyncio.to_thread(ytdl.fetch_media, job.source_url, dest, self.config.limits, enabled=True,
                                           rules=rules)
        return await download(job.source_url, dest, self.config.limits.max_input_bytes, rules=rules)

    async def _serve_from_cache(self, job: Job) -> bool:
        """Answer from the stored stems of an earlier, identical request. Not charged."""
        cached = await self.store.find_cached(job)
        if cached is None:
            return False
        try:
            # Same model, stems and format as this job; a tampered row is never reused.
            checked = check_artifacts(cached, cached.artifacts)
        except ResultsRefused as exc:
            log.warning("job %s: not serving the cache of job %s: %s", job.id, cached.id, exc.why)
            return False
        artifacts = checked.artifacts()
        names = checked.names
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
            await self.settle_cancelled(job.id)
            return True
        log.info("job %s: served from the cache of job %s", job.id, cached.id)
        await self.storage.delete_input_async(job.id)
        await asyncio.shield(self.start_delivery(await self.store.require(job.id)))
        return True

    def delivery_under_way(self, job_id: int) -> bool:
        return job_id in self._deliveries

    def start_delivery(self, job: Job) -> asyncio.Task[None]:
        """Deliver a job in `delivering`, retrying; a stop waits for it (see `stop`). One
        delivery per job at a time: while one is under way, that one is returned."""
        under_way = self._deliveries.get(job.id)
        if under_way is not None:
            return under_way
        task = self._deliveries[job.id] = asyncio.create_task(self._deliver(job), name=f"deliver-{job.id}")
        task.add_done_callback(lambda _: self._deliveries.pop(job.id, None))
        return task

    async def resume_deliveries(self) -> list[int]:
        """Start again the deliveries a database error cut short: jobs in `delivering` with
        no delivery under way in this bot (the only one on its database, core.ops.bot_lock).
        Called by the sweeper's stale pass, `RESUMED_PER_PASS` jobs at most. A job whose
        results already went out only has its end written (see `_deliver`)."""
        resumed: list[int] = []
        for job in await self.store.delivering(RESUMED_PER_PASS, besides=list(self._deliveries)):
            if self.delivery_under_way(job.id):  # started while the rows were read
                continue
            log.info("job %s: resuming its delivery", job.id)
            self.start_delivery(job)
            resumed.append(job.id)
        return resumed

    async def _deliver(self, job: Job) -> None:
        """Send a job's results and mark it done. A database error leaves it `delivering`
        with no delivery under way, which `resume_deliveries` picks up; once the results
        went out, only the `done` is written again, so they are never sent twice."""
        try:
            if job.id not in self._sent:
                if not await self._send(job):
                    return
            await self._mark_delivered(job.id)
        except (*DATABASE_ERRORS, WriteAbandoned) as exc:
            log.error("job %s: delivery stopped by a database error (%s); resumed once the database answers",
                      job.id, type(exc).__name__)

    async def _send(self, job: Job) -> bool:
        """Send the results (or fail the job). Returns whether they went out."""
        try:
            # The row keeps only what was checked, names made by the bot: the results cache
            # and any later delivery act on that, never on what the worker wrote.
            checked = check_artifacts(job, job.artifacts)
        except ResultsRefused as exc:
            await self.refuse_results(job.id, exc.why)
            return False
        # Written only while the job is still `delivering`: one delivered (or cancelled)
        # meanwhile is not sent (again).
        if not await self.store.update(job.id, in_state=JobState.delivering, artifacts=checked.artifacts()):
            return False
        job = await self.store.require(job.id)
        try:
            # Through an outage of Discord (5xx, connections refused) or of the storage the
            # stems are read from, the job stays `delivering` and is tried again.
            await retry_transient(lambda: self.notifier.deliver(job), transient=self.transient,
                                  budget_s=self.config.transient_retry_s, outage=self.discord_outage)
        except asyncio.CancelledError:
            raise
        except ResultsRefused as exc:  # the files failed the check: no retry
            await self.refuse_results(job.id, exc.why)
            return False
        except DependencyDown as exc:
            log.error("job %s: delivery failed for good: %s", job.id, exc)
            await self.fail_outage(job.id, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - not an outage: trying again would fail the same way
            log.error("job %s: delivery failed: %r", job.id, exc)
            await self.fail(job.id, "the stems were made but could not be sent to Discord", "delivery_failed")
            return False
        self._sent.add(job.id)
        return True

    async def _mark_delivered(self, job_id: int) -> None:
        """Write that a job's results went out, retried through a short database outage."""
        now = utcnow()
        await retry_write(f"job {job_id}'s delivery", lambda: self.store.transition(
            job_id, JobState.done, delivered_at=now, notified_at=now), self.config.stale_s)
        self._sent.discard(job_id)
        self._finish_metrics(await self.store.get(job_id))

    # -- endings -----------------------------------------------------------------------

    async def or_fail(self, job_id: int, step: Awaitable[None], what: str) -> None:
        """Await `step`; an unexpected error fails the job: one job must never stop the others.
        A database error does not: the job is left running, its heartbeat goes stale, and
        the sweeper puts it back in the queue (`JobStore.recover_stale`), as it does when
        failing the job does not go through either."""
        try:
            await step
        except asyncio.CancelledError:
            raise
        except DependencyDown as exc:
            log.error("job %s: %s: %s", job_id, what, exc)
            await self.fail_outage(job_id, exc)
        except (SQLAlchemyError, WriteAbandoned) as exc:  # not OSError: the step fetches and stores files too
            log.error("job %s: %s (%s); the sweeper takes it back once its heartbeat is stale", job_id, what,
                      type(exc).__name__, exc_info=exc)
        except Exception:
            log.exception("job %s: %s", job_id, what)
            try:
                await retry_write(f"job {job_id}'s failure", lambda: self.fail(
                    job_id, "something went wrong on our side; please try again", "internal"), self.config.stale_s)
            except WriteAbandoned:
                log.exception("job %s: could not fail it; the sweeper takes it back once its heartbeat is stale",
                              job_id)

    async def recovered(self, jobs: list[Recovered]) -> None:
        """The sweeper took these jobs back from runs that stopped heartbeating: stop what
        may still run of them, report the failed ones, show the requeued ones."""
        for recovered in jobs:
            log.warning("job %s: its run stopped heartbeating; %s", recovered.job_id,
                        "failed: out of attempts" if recovered.state is JobState.failed else "back in the queue")
            try:
                await self.execution.withdraw(recovered.job_id, recovered.queue_job_id)
            except Exception:
                log.warning("job %s: could not withdraw its old run", recovered.job_id, exc_info=True)
            job = await self.store.get(recovered.job_id)
            if recovered.state is JobState.failed:
                await self.storage.delete_job(recovered.job_id)
                await self.ended(job)
            elif job is not None:
                self.spawn(self.notify(job))
        if jobs:
            self.wake()

    async def refuse_results(self, job_id: int, why: str) -> None:
        """Fail a job whose results did not check out: not charged (failing releases the
        minutes), its files deleted, so never cached; the reason is for the operator only."""
        log.warning("job %s: the worker's results were refused: %s", job_id, why)
        await self.fail(job_id, RESULTS_REFUSED, "bad_results")

    async def fail_outage(self, job_id: int, exc: DependencyDown) -> None:
        """Fail a job whose dependency stayed down for the whole retry budget: uncharged
        (failing releases the minutes), told why in a few words."""
        text = DISCORD_OUTAGE if exc.name == self.discord_outage.name else STORAGE_OUTAGE
        await self.fail(job_id, text.format(minutes=f"{exc.budget_s / 60:.0f}"), "outage")

    async def fail(self, job_id: int, reason: str, kind: str | None) -> None:
        """Fail the job and report it; if it was cancelled meanwhile, settle that instead."""
        if await self.store.transition(job_id, JobState.failed, error=reason, error_kind=kind or "error"):
            await self.discard_files(job_id)
            await self.ended(await self.store.get(job_id))
        else:
            await self.settle_cancelled(job_id)

    async def settle_cancelled(self, job_id: int) -> None:
        """If the job is cancelled: delete its files and report its end."""
        job = await self.store.get(job_id)
        if job is not None and job.job_state is JobState.cancelled:
            await self.discard_files(job_id)
            await self.ended(job)

    async def discard_files(self, job_id: int) -> None:
        """Delete an ended job's files. It never raises: the storage may be what failed the
        job, and its user must be told all the same. What stays behind the sweeper deletes
        after the retention (`finished_before`)."""
        try:
            await self.storage.delete_job(job_id)
        except Exception as exc:  # noqa: BLE001 - logged; the sweeper deletes them later
            log.warning("job %s: its files could not be deleted now (%s); the sweeper deletes them later",
                        job_id, exc)

    async def discard_input(self, job_id: int) -> None:
        """Delete a separated job's input; like `discard_files`, it never raises."""
        try:
            await self.storage.delete_input_async(job_id)
        except Exception as exc:  # noqa: BLE001 - logged; it goes with the job's files
            log.warning("job %s: its input could not be deleted now (%s)", job_id, exc)

    async def ended(self, job: Job | None) -> None:
        """Count and report a failed or cancelled job, once per end."""
        if job is None or _end_told(job):
            return
        end = (job.id, job.finished_at)
        if end in self._reporting or end in self._told:
            return
        self._reporting.add(end)
        try:
            self._finish_metrics(job)
            try:
                await retry_transient(lambda: self.notifier.job_ended(job), transient=self.transient,
                                      budget_s=self.config.transient_retry_s, outage=self.discord_outage)
            except Exception:
                log.exception("job %s: could not report its end", job.id)
                return  # left untold: the next start tries again
            try:
                await self.store.update(job.id, notified_at=utcnow())
            except Exception:
                log.exception("job %s: could not note that its end was reported", job.id)
        finally:
            self._reporting.discard(end)
            self._told.add(end)

    def remembered_ends(self) -> int:
        """How many job ends the dispatcher keeps in memory (bounded; for tests and metrics)."""
        return len(self._reporting) + len(self._told)

    def _finish_metrics(self, job: Job | None) -> None:
        if self.metrics is None or job is None:
            return
        self.metrics.job_finished(job.state, kind=job.error_kind, separation_s=job.separation_s,
                                  audio_s=job.duration_s if job.job_state is JobState.done else None)

    # -- telling the notifier ----------------------------------------------------------

    async def notify_id(self, job_id: int) -> None:
        job = await self.store.get(job_id)
        if job is not None:
            await self.notify(job)

    async def show_places(self, jobs: Iterable[Job]) -> None:
        """Show queued jobs their new place after the queue moved: the order computed once,
        then their messages redrawn `PLACES_PER_STEP` at a time, the event loop running
        between steps (a thousand redraws started at once all run in one turn of the loop,
        holding it for tens of milliseconds)."""
        await self.store.board.places()
        for k, job in enumerate(jobs, start=1):
            self.spawn(self.notify(job))
            if k % PLACES_PER_STEP == 0:
                await asyncio.sleep(0)

    async def notify(self, job: Job) -> None:
        """Show the job's state; a failure to show it is logged, never raised."""
        try:
            await self.notifier.job_changed(job)
        except Exception:
            log.exception("job %s: progress update failed", job.id)


def _end_told(job: Job) -> bool:
    """Whether the row says this end of the job was told (a retried job's older telling does not count)."""
    if job.notified_at is None or job.finished_at is None:
        return False
    return as_utc(job.notified_at) >= as_utc(job.finished_at)

