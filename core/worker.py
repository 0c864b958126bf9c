"""The local worker: supervises the model host child process from asyncio.

It spawns the host, waits until the model is loaded and warmed up, hands it one job at
a time, relays its events, cancels within a segment, and notices when the host dies
(killed, out of memory) so the job can be retried on a fresh host.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import asdict
from typing import Awaitable, Callable

from .errors import StembotError
from .model_host import HostConfig, JobSpec, host_main

log = logging.getLogger(__name__)

EventHandler = Callable[[dict], Awaitable[None] | None]


class WorkerCrashed(Exception):
    """The model host died while it had a job."""


class WorkerUnavailable(StembotError):
    kind = "worker_unavailable"


class LocalWorker:
    def __init__(self, config: HostConfig, start_timeout_s: float = 600.0):
        self.config = config
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._process = None
        self._requests = None
        self._events = None
        self._cancel = self._ctx.Value("q", 0)
        self._inbox: asyncio.Queue | None = None
        self._reader: threading.Thread | None = None
        self._stop_reader = threading.Event()
        self._lock = asyncio.Lock()
        self.ready = False
        self.info: dict = {}
        self.current_job: int | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    async def start(self) -> dict:
        """Spawn the host and wait for it to report ready. Raises WorkerUnavailable with
        the host's reason when the model cannot be loaded."""
        loop = asyncio.get_running_loop()
        self._inbox = asyncio.Queue()
        self._requests = self._ctx.Queue()
        self._events = self._ctx.Queue()
        self._cancel.value = 0
        self._process = self._ctx.Process(
            target=host_main, args=(self.config, self._requests, self._events, self._cancel),
            name="stembot-model-host", daemon=True,
        )
        started = time.monotonic()
        self._process.start()
        self._stop_reader = threading.Event()
        self._reader = threading.Thread(target=self._read_events, args=(loop, self._events, self._stop_reader),
                                        name="model-host-events", daemon=True)
        self._reader.start()
        event = await self._next_event(timeout=self.start_timeout_s)
        if event.get("type") != "ready":
            await self.stop()
            raise WorkerUnavailable(event.get("reason", "the model host did not start"))
        self.ready = True
        self.info = {**event, "start_s": time.monotonic() - started}
        log.info("model host ready: %s on %s in %.1f s (load %.1f s, warm-up %.1f s)", event["model"],
                 event["device"], self.info["start_s"], event["load_s"], event["warmup_s"])
        return self.info

    def _read_events(self, loop: asyncio.AbstractEventLoop, events, stop: threading.Event) -> None:
        """Thread: move events from the process queue into the asyncio inbox; report
        the host's death as an event too."""
        process = self._process
        inbox = self._inbox
        while not stop.is_set():
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if not process.is_alive():
                    event = {"type": "died", "exitcode": process.exitcode}
                else:
                    continue
            except (EOFError, OSError):
                event = {"type": "died", "exitcode": process.exitcode}
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # loop closed
                return
            if event["type"] == "died":
                return

    async def _next_event(self, timeout: float | None = None) -> dict:
        event = await asyncio.wait_for(self._inbox.get(), timeout)
        if event["type"] == "died":
            self.ready = False
            log.warning("model host died (exit code %s)", event.get("exitcode"))
        return event

    async def run(self, spec: JobSpec, on_event: EventHandler | None = None) -> dict:
        """Run one job on the host; returns its final event (done, failed or cancelled).
        Raises WorkerCrashed when the host died meanwhile (it is restarted first)."""
        async with self._lock:
            if not self.alive() or not self.ready:
                await self.restart()
            self.current_job = spec.job_id
            self._cancel.value = 0
            self._requests.put(asdict(spec))
            try:
                while True:
                    event = await self._next_event()
                    if event["type"] == "died":
                        await self.restart()
                        raise WorkerCrashed(f"the model host died (exit code {event.get('exitcode')})")
                    if event.get("job") != spec.job_id:
                        continue  # a late event of an earlier job
                    if event["type"] in ("done", "failed", "cancelled"):
                        return event
                    if on_event is not None:
                        result = on_event(event)
                        if asyncio.iscoroutine(result):
                            await result
            except asyncio.CancelledError:
                # Our caller gave up on the job (aborted, shutting down): stop the host's
                # work too, or it would still be separating when the next job arrives.
                await asyncio.shield(self._abandon(spec.job_id))
                raise
            finally:
                self.current_job = None

    async def _abandon(self, job_id: int, timeout_s: float = 30.0) -> None:
        """Cancel `job_id` on the host and wait until it says it stopped (it checks between
        segments); a host that does not answer in time is stopped (the next job starts a
        fresh one)."""
        self._cancel.value = job_id
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    event = await self._next_event()
                    if event["type"] == "died" or (
                            event.get("job") == job_id and event["type"] in ("done", "failed", "cancelled")):
                        return
        except TimeoutError:
            log.warning("job %s: the model host did not stop in %.0f s; stopping it", job_id, timeout_s)
            await self.stop()

    def cancel(self, job_id: int) -> None:
        """Ask the host to stop `job_id` at its next segment (no-op if it is not running it)."""
        self._cancel.value = job_id

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def stop(self) -> None:
        self.ready = False
        self._stop_reader.set()
        process, self._process = self._process, None
        if process is None:
            return
        if process.is_alive():
            try:
                self._requests.put(None)
            except (OSError, ValueError):
                pass
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 2)
