"""Event-loop lag: how late a task that sleeps for a fixed interval wakes up.

A blocked or starved event loop shows here before users notice slow replies; the bot
exports it as `stembot_event_loop_lag_seconds` (a histogram) and its maximum.

The garbage collector's full collections stop the loop too: each walks every tracked
object, and the modules, classes and functions imported at start-up (discord.py,
SQLAlchemy, aiohttp, numpy) are most of them. `freeze_start_up_heap` takes those out of
its reach once the bot has started (measured: 70-100 ms per full collection before,
which one finished job with a long queue triggered, see docs/performance.md).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

# Histogram bounds, in seconds: fine where replies feel instant, coarse beyond.
LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def freeze_start_up_heap() -> None:
    """Move every object alive now into the collector's permanent generation, where no
    collection walks it: what start-up built lives as long as the process anyway. Objects
    made later are collected as usual."""
    gc.collect()  # what start-up left as garbage is freed, not frozen
    gc.freeze()


class LoopLagMonitor:
    def __init__(self, observe: Callable[[float], None], interval_s: float = 0.05):
        self.observe = observe
        self.interval_s = interval_s
        self.max_s = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - before - self.interval_s)
            self.max_s = max(self.max_s, lag)
            self.observe(lag)
