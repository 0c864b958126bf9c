"""The event-loop lag monitor sees a blocked loop, and little else on an idle one."""

from __future__ import annotations

import asyncio
import time

from core.ops.looplag import LoopLagMonitor
from core.ops.web import Metrics


async def test_a_blocked_loop_is_measured():
    seen: list[float] = []
    monitor = LoopLagMonitor(seen.append, interval_s=0.01)
    monitor.start()
    await asyncio.sleep(0.1)
    time.sleep(0.25)  # noqa: ASYNC251 - what a blocking call in a handler would do: the point of the test
    await asyncio.sleep(0.05)
    await monitor.stop()
    assert len(seen) >= 5
    assert 0.2 <= max(seen) < 1.0 and monitor.max_s == max(seen)
    assert sorted(seen)[len(seen) // 2] < 0.05  # the rest of the time it ran on time


async def test_lag_is_exported_as_a_histogram():
    metrics = Metrics()
    monitor = LoopLagMonitor(metrics.loop_lag_seconds.observe, interval_s=0.01)
    monitor.start()
    await asyncio.sleep(0.1)
    await monitor.stop()
    text = metrics.render().decode()
    count = next(line for line in text.splitlines() if line.startswith("stembot_event_loop_lag_seconds_count"))
    assert float(count.split()[-1]) >= 5
    assert 'stembot_event_loop_lag_seconds_bucket{le="0.05"}' in text
