"""The local worker: supervises the model host child process from asyncio.

It spawns the host, waits until the model is loaded and warmed up, hands it jobs (one
at a time on a CPU; on a GPU up to the host's `capacity`, whose segments it batches),
relays each job's events to its caller, cancels within a segment, and notices when the
host dies (killed, out of memory) so its jobs can be retried on a fresh host.

The host starts with a minimal environment (`core.helper_env`): the model caches, the
device and thread settings, the proxy for a model download, and none of the bot's or
the worker's secrets (token, storage keys, database URL, link secret).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from core.errors import StembotError
from core.helper_env import CA_NAMES, PROXY_NAMES, HelperProcess, helper_env
from core.host.child import host_main
from core.host.protocol import (
    CancelBoard,
    CancelledEvent,
    DiedEvent,
    DoneEvent,
    FailedEvent,
    FatalEvent,
    HostConfig,
    HostEvent,
    JobEndEvent,
    JobProgressEvent,
    JobSpec,
    ProgressEvent,
    ReadyEvent,
    StageEvent,
)

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue

log = logging.getLogger(__name__)

# Called with each stage and progress event of a job (awaited if it returns a coroutine).
EventHandler = Callable[[JobProgressEvent], Awaitable[None] | None]


class HostCrashed(Exception):
    """The model host died while it had a job."""


class HostTimedOut(HostCrashed):
    """The job ran past its deadline: the model host was killed (and started again)."""


# How much a new measure of a host's speed moves the running one.
SPEED_WEIGHT = 0.3


@dataclass(frozen=True)
class Deadline:
    """How long a job may take on a host: `margin_s` + `factor` x its length x the host's
    seconds of separation per second of audio (as measured on its finished jobs; before
    any, `default_speed`). Before the length is known (decoding), the longest track allowed
    stands in for it."""

    margin_s: float = 300.0
    factor: float = 4.0
    default_speed: float = 2.0

    def seconds(self, duration_s: float, speed: float | None) -> float:
        return self.margin_s + self.factor * duration_s * (self.default_speed if speed is None else speed)


class HostUnavailable(StembotError):
    kind = "worker_unavailable"


class HostHandle:
    """The bot's side of one model host: starts it, hands it jobs, relays their events."""

    def __init__(self, config: HostConfig, start_timeout_s: float = 600.0, deadline: Deadline | None = None):
        self.config = config
        self.start_timeout_s = start_timeout_s
        self.deadline = deadline
        # Seconds of separation per second of audio, a running measure over finished jobs
        # (None until one finished); it survives restarts of the host process.
        self.speed: float | None = None
        self._ctx = mp.get_context("spawn")
        self._process: BaseProcess | None = None
        self._requests: Queue[JobSpec | None] | None = None
        self._events: Queue[HostEvent] | None = None
        self._cancel = CancelBoard(self._ctx)
        self._inbox: asyncio.Queue[HostEvent] | None = None
        self._reader: threading.Thread | None = None
        self._router: asyncio.Task[None] | None = None
        self._stop_reader = threading.Event()
        self._restart_lock = asyncio.Lock()
        self._seats: asyncio.Semaphore | None = None
        self._listeners: dict[int, asyncio.Queue[HostEvent]] = {}  # job id -> its events
        self.ready = False
        # The ready event's fields as a dict, with "type": "ready" and the seconds the start took.
        self.info: dict[str, Any] = {}
        self.capacity = 1  # jobs at once, as the host says when ready
        self.current_jobs: set[int] = set()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    async def start(self) -> dict[str, Any]:
        """Spawn the host and wait for it to report ready. Raises HostUnavailable with
        the host's reason when the model cannot be loaded."""
        loop = asyncio.get_running_loop()
        self._inbox = asyncio.Queue()
        self._requests = self._ctx.Queue()
        self._events = self._ctx.Queue()
        self._process = HelperProcess(
            target=host_main, args=(self.config, self._requests, self._events, self._cancel),
            name="stembot-model-host", daemon=True, env=helper_env((*PROXY_NAMES, *CA_NAMES)),
        )
        started = time.monotonic()
        self._process.start()
        self._stop_reader = threading.Event()
        self._reader = threading.Thread(target=self._read_events, args=(loop, self._events, self._stop_reader),
                                        name="model-host-events", daemon=True)
        self._reader.start()
        async with asyncio.timeout(self.start_timeout_s):
            event = await self._next_event()
        if not isinstance(event, ReadyEvent):
            await self.stop()
            raise HostUnavailable(event.reason if isinstance(event, FatalEvent) else "the model host did not start")
        self.ready = True
        self.info = {"type": "ready", **asdict(event), "start_s": time.monotonic() - started}
        self.capacity = event.capacity
        if self._seats is None:
            self._seats = asyncio.Semaphore(self.capacity)
        self._router = asyncio.create_task(self._route(), name="model-host-router")
        log.info("model host ready: %s on %s in %.1f s (load %.1f s, warm-up %.1f s)", event.model,
                 event.device, self.info["start_s"], event.load_s, event.warmup_s)
        return self.info

    def _read_events(self, loop: asyncio.AbstractEventLoop, events: Queue[HostEvent],
                     stop: threading.Event) -> None:
        """Thread: move events from the process queue into the asyncio inbox; report
        the host's death as an event too."""
        process = self._process
        inbox = self._inbox
        assert process is not None and inbox is not None
        while not stop.is_set():
            event: HostEvent
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if not process.is_alive():
                    event = DiedEvent(process.exitcode)
                else:
                    continue
            except (EOFError, OSError):
                event = DiedEvent(process.exitcode)
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # loop closed
                return
            if isinstance(event, DiedEvent):
                return

    async def _next_event(self) -> HostEvent:
        assert self._inbox is not None
        event = await self._inbox.get()
        if isinstance(event, DiedEvent):
            self.ready = False
            log.warning("model host died (exit code %s)", event.exitcode)
        return event

    async def _route(self) -> None:
        """Hand each event to its job's caller; the host's death to every caller."""
        while True:
            event = await self._next_event()
            match event:
                case DiedEvent():
                    self._tell_all_died(event)
                    return
                case StageEvent() | ProgressEvent() | DoneEvent() | FailedEvent() | CancelledEvent():
                    listener = self._listeners.get(event.job)
                    if listener is not None:  # else: a late event of an abandoned job
                        listener.put_nowait(event)

    def _tell_all_died(self, event: DiedEvent) -> None:
        for listener in self._listeners.values():
            listener.put_nowait(event)

    async def _ensure_started(self) -> None:
        async with self._restart_lock:  # several jobs may find the host dead at once
            if not self.alive() or not self.ready:
                await self.restart()

    async def run(self, spec: JobSpec, on_event: EventHandler | None = None) -> JobEndEvent:
        """Run one job on the host; returns its final event (done, failed or cancelled).
        Raises HostCrashed when the host died meanwhile (it is restarted first), and
        HostTimedOut when the job ran past its deadline (the host is killed and restarted:
        a hung forward pass does not listen to a cancel). An error of `on_event` cancels the
        job on the host before it is raised: nobody would take its result."""
        if self._seats is None:
            await self._ensure_started()  # the host says how many jobs it takes
        assert self._seats is not None
        async with self._seats:
            await self._ensure_started()
            assert self._requests is not None
            job = spec.job_id
            events: asyncio.Queue[HostEvent] = asyncio.Queue()
            self._listeners[job] = events
            self.current_jobs.add(job)
            self._cancel.discard(job)  # a retry of a job abandoned here before
            self._requests.put(spec)
            loop = asyncio.get_running_loop()
            # Until the host says the track's length, the longest track allowed stands in.
            due = self._due(loop.time(), self.config.max_duration_s)
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), None if due is None else due - loop.time())
                    except TimeoutError:
                        await self._overran(job)
                        raise HostTimedOut("the model host ran past the job's deadline") from None
                    match event:
                        case DiedEvent():
                            await self._ensure_started()
                            raise HostCrashed(f"the model host died (exit code {event.exitcode})")
                        case DoneEvent(result=result):
                            self._measure(result.separation_s, result.duration_s)
                            return event
                        case FailedEvent() | CancelledEvent():
                            return event
                        case StageEvent(stage="separating", duration_s=duration_s) if duration_s is not None:
                            due = self._due(loop.time(), duration_s)
                    if isinstance(event, StageEvent | ProgressEvent) and on_event is not None:
                        try:
                            handled = on_event(event)
                            if asyncio.iscoroutine(handled):
                                await handled
                        except Exception:
                            await asyncio.shield(self._abandon(job, events))
                            raise
            except asyncio.CancelledError:
                # Our caller gave up on the job (aborted, shutting down): stop the host's
                # work too, or it would still be separating when the next job arrives.
                await asyncio.shield(self._abandon(job, events))
                raise
            finally:
                self._listeners.pop(job, None)
                self.current_jobs.discard(job)

    def _due(self, now: float, duration_s: float) -> float | None:
        """When a job of `duration_s` seconds started `now` is past its deadline (None: never)."""
        return None if self.deadline is None else now + self.deadline.seconds(duration_s, self.speed)

    def _measure(self, separation_s: float, duration_s: float) -> None:
        if duration_s <= 0 or separation_s <= 0:
            return  # served without separating (nothing to learn)
        speed = separation_s / duration_s
        self.speed = speed if self.speed is None else (1 - SPEED_WEIGHT) * self.speed + SPEED_WEIGHT * speed

    async def _overran(self, job_id: int) -> None:
        """Kill the host that holds `job_id` past its deadline, and start a fresh one (its
        other jobs hear that it died, and go back to the queue like after a crash)."""
        log.warning("job %s: past its deadline on the model host (%s s of separation per s of audio); killing "
                    "the host", job_id, "unmeasured" if self.speed is None else f"{self.speed:.2f}")
        async with self._restart_lock:
            await self.stop(grace_s=0.0)
            await self.start()

    async def _abandon(self, job_id: int, events: asyncio.Queue[HostEvent], timeout_s: float = 30.0) -> None:
        """Cancel `job_id` on the host and wait until it says it stopped (it checks within
        segments); a host that does not answer in time is stopped (the next job starts a
        fresh one)."""
        self._cancel.add(job_id)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    event = await events.get()
                    if isinstance(event, DiedEvent | DoneEvent | FailedEvent | CancelledEvent):
                        return
        except TimeoutError:
            log.warning("job %s: the model host did not stop in %.0f s; stopping it", job_id, timeout_s)
            await self.stop()

    def cancel(self, job_id: int) -> None:
        """Ask the host to stop `job_id` soon (no-op if it is not running it)."""
        self._cancel.add(job_id)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop the host: ask it to quit, then kill it after `grace_s` (at once with 0)."""
        self.ready = False
        self._stop_reader.set()
        process, self._process = self._process, None
        if process is None:
            return
        if process.is_alive() and grace_s > 0:
            try:
                if self._requests is not None:
                    self._requests.put(None)
            except (OSError, ValueError):
                pass
            await asyncio.to_thread(process.join, grace_s)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, 5)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 2)
        if self._router is not None:
            self._router.cancel()
            self._router = None
        # Jobs still waiting on this host will hear nothing more from it.
        self._tell_all_died(DiedEvent(process.exitcode))
