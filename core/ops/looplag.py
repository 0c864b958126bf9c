"""Event-loop lag: how late a task that sleeps for a fixed interval wakes up.

A blocked or starved event loop shows here before users notice slow replies; the bot
exports it as `stembot_event_loop_lag_seconds` (a histogram) and its maximum.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# Histogram bounds, in seconds: fine where replies feel instant, coarse beyond.
LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


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
