"""Riding out a dependency's outage: transient errors retried with backoff, and who is down.

A call to a dependency (the object store, Discord) that fails with a transient error (an
HTTP 5xx, a timeout, a refused or reset connection) is tried again after an exponential
backoff with full jitter (a random wait between 0 and the backoff, so that many waiting
jobs do not all come back at once), until a total time budget runs out. Any other error
(a 4xx: the request itself is wrong) is raised at once. While a call is being retried its
dependency is noted down (`Outage`): the dispatcher starts no new job into the outage, and
/readyz says so. When the budget runs out, `DependencyDown` says which dependency stayed
away; the job then fails with a short message, uncharged.

A leaf: it imports nothing from core, so every layer (storage, jobs, the bot) uses it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BUDGET_S = 300.0
BASE_DELAY_S = 0.5
MAX_DELAY_S = 15.0


class DependencyDown(Exception):
    """A dependency kept failing with transient errors for a whole retry budget."""

    def __init__(self, name: str, budget_s: float, cause: BaseException) -> None:
        super().__init__(f"{name} unreachable for {budget_s:.0f} s ({type(cause).__name__})")
        self.name = name
        self.budget_s = budget_s


class Outage:
    """Whether one dependency is known to be down: while at least one call to it is
    being retried after a transient error. When the last such call ends (it went through,
    or its budget ran out) the dependency counts as up again, so new work may try it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.retrying = 0  # calls waiting on this dependency right now
        self.down_since: float | None = None  # time.monotonic() of the first of them
        self.last_error = ""

    @property
    def down(self) -> bool:
        return self.retrying > 0

    def _enter(self, exc: BaseException) -> None:
        self.retrying += 1
        self.last_error = type(exc).__name__
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s is failing (%s): waiting for it to come back", self.name, self.last_error)

    def _leave(self, through: bool) -> None:
        self.retrying -= 1
        if self.retrying == 0 and self.down_since is not None:
            elapsed = time.monotonic() - self.down_since
            if through:
                log.info("%s answers again after %.0f s", self.name, elapsed)
            else:
                log.error("%s still failing after %.0f s: giving up on the call", self.name, elapsed)
            self.down_since = None


def backoff_s(attempt: int, base_s: float = BASE_DELAY_S, cap_s: float = MAX_DELAY_S) -> float:
    """Full jitter: a random wait between 0 and min(cap, base x 2^attempt)."""
    return random.uniform(0.0, min(cap_s, base_s * 2 ** attempt))


async def retry_transient(call: Callable[[], Awaitable[T]], *, transient: Callable[[BaseException], bool],
                          budget_s: float, outage: Outage, base_s: float = BASE_DELAY_S,
                          cap_s: float = MAX_DELAY_S) -> T:
    """Await `call()`, calling it again after a transient error (`transient(exc)`) until it
    succeeds or `budget_s` seconds have passed since the first try; then DependencyDown.
    Any other error is raised at once. `outage` is noted down while retrying."""
    deadline = time.monotonic() + budget_s
    attempt = 0
    waiting = False
    through = False
    try:
        while True:
            try:
                result = await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, DependencyDown) or not transient(exc):
                    raise
                if not waiting:
                    waiting = True
                    outage._enter(exc)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DependencyDown(outage.name, budget_s, exc) from exc
                log.debug("%s: transient %r, try %d", outage.name, exc, attempt + 1)
                await asyncio.sleep(min(left, backoff_s(attempt, base_s, cap_s)))
                attempt += 1
                continue
            through = True
            return result
    finally:
        if waiting:
            outage._leave(through)


def network_error(exc: BaseException) -> bool:
    """Errors of the connection itself: refused, reset, unreachable, timed out."""
    return isinstance(exc, ConnectionError | TimeoutError)
