"""Writes of a job's state that outlast a short database outage: retried with backoff and
jitter for a bounded time, then given up (the job's heartbeat goes stale and the sweeper
takes it back, see `JobStore.recover_stale`)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a database that is away raises: the driver's errors (wrapped by SQLAlchemy), or the
# socket's when a connection cannot even be opened.
DATABASE_ERRORS = (SQLAlchemyError, OSError)
RETRY_BASE_S = 0.5
RETRY_MAX_S = 15.0


class WriteAbandoned(Exception):
    """The database did not answer a job's write within the bound: the run gave the job up."""


async def retry_write(what: str, write: Callable[[], Awaitable[T]], within_s: float) -> T:
    """Await `write()`; on a database error try again, after 0.5 s doubling up to 15 s (each
    wait jittered down to half, so that many writers do not come back at once), until
    `within_s` has passed. Raises WriteAbandoned then."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within_s
    delay = RETRY_BASE_S
    failures = 0
    while True:
        try:
            result = await write()
        except DATABASE_ERRORS as exc:
            failures += 1
            wait = delay * random.uniform(0.5, 1.0)
            if loop.time() + wait > give_up:
                raise WriteAbandoned(f"could not write {what} in {within_s:.0f} s: {type(exc).__name__}") from exc
            log.warning("could not write %s (%s, %d in a row); trying again in %.1f s", what, type(exc).__name__,
                        failures, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        if failures:
            log.info("wrote %s after %d failed tries", what, failures)
        return result
