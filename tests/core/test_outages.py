"""The retry helper of core.outages: transient errors tried again with full-jitter backoff
within a time budget, anything else raised at once, and the dependency noted down while
calls wait on it."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.outages import DependencyDown, Outage, backoff_s, network_error, retry_transient


class Flaky:
    """A call that fails with `error` until `fails` tries have been made, then answers."""

    def __init__(self, fails: int, error: BaseException) -> None:
        self.fails = fails
        self.error = error
        self.tries = 0

    async def __call__(self) -> str:
        self.tries += 1
        if self.tries <= self.fails:
            raise self.error
        return "answer"


def test_full_jitter_stays_between_zero_and_the_capped_backoff():
    for attempt in range(12):
        waits = [backoff_s(attempt, base_s=0.5, cap_s=15.0) for _ in range(200)]
        assert all(0.0 <= w <= min(15.0, 0.5 * 2 ** attempt) for w in waits)
        assert max(waits) > min(15.0, 0.5 * 2 ** attempt) / 2  # spread, not a fixed delay
    assert min(backoff_s(10) for _ in range(200)) < 5.0  # jitter from 0: waiters do not all come back at once


async def test_transient_errors_are_tried_again_until_the_call_goes_through():
    call, outage = Flaky(3, ConnectionRefusedError()), Outage("store")
    seen_down = []

    async def watch():
        while call.tries < 4:
            seen_down.append(outage.down)
            await asyncio.sleep(0.001)
    watcher = asyncio.create_task(watch())
    assert await retry_transient(call, transient=network_error, budget_s=10, outage=outage, base_s=0.01) == "answer"
    await watcher
    assert call.tries == 4
    assert True in seen_down and not outage.down and outage.down_since is None


async def test_other_errors_are_raised_at_once():
    call, outage = Flaky(1, PermissionError("403")), Outage("store")
    with pytest.raises(PermissionError):
        await retry_transient(call, transient=network_error, budget_s=10, outage=outage, base_s=0.01)
    assert call.tries == 1 and not outage.down


async def test_the_budget_bounds_the_wait_then_dependency_down_names_it():
    call, outage = Flaky(10_000, TimeoutError()), Outage("the object store")
    started = time.monotonic()
    with pytest.raises(DependencyDown) as raised:
        await retry_transient(call, transient=network_error, budget_s=0.3, outage=outage, base_s=0.01, cap_s=0.05)
    assert 0.3 <= time.monotonic() - started < 1.0
    assert raised.value.name == "the object store" and raised.value.budget_s == 0.3
    assert isinstance(raised.value.__cause__, TimeoutError)
    assert call.tries > 3 and not outage.down  # nobody waits on it any more: new work may try it


async def test_a_dependency_is_down_while_any_call_waits_on_it():
    outage = Outage("Discord")
    # About 0.25 s of waits for the slow one (50 tries, 0-10 ms each), under 1 ms for the quick one.
    slow, quick = Flaky(50, ConnectionResetError()), Flaky(1, ConnectionResetError())
    both = asyncio.gather(
        retry_transient(slow, transient=network_error, budget_s=10, outage=outage, base_s=0.01, cap_s=0.01),
        retry_transient(quick, transient=network_error, budget_s=10, outage=outage, base_s=0.001, cap_s=0.001))
    await asyncio.sleep(0.05)
    assert quick.tries == 2 and slow.tries < 50 and outage.down  # one still waits
    assert await both == ["answer", "answer"]
    assert not outage.down
