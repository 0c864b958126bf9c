"""A run's heartbeat on its job's row, written while the run goes on: the sweeper takes back
a running job whose heartbeat went stale (`JobStore.recover_stale`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from core.jobs.job import RUNNING, JobState, Lease
from core.jobs.store import JobStore
from core.jobs.write_retry import DATABASE_ERRORS

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def heartbeat(store: JobStore, job_id: int, lease: Lease, interval_s: float, *,
                    in_state: JobState | tuple[JobState, ...] = RUNNING,
                    on_fenced: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Write the job's heartbeat every `interval_s` while the body runs, whatever it does.
    A beat the database refuses is skipped (a short outage is not a stuck job); when the
    run no longer holds the job (taken back, or moved on), `on_fenced` is called and the
    beats stop."""
    async def beat() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                held = await store.beat(job_id, lease, in_state)
            except DATABASE_ERRORS as exc:
                log.warning("job %s: heartbeat not written (%s)", job_id, type(exc).__name__)
                continue
            if not held and on_fenced is not None:
                on_fenced()
                return

    task = asyncio.create_task(beat(), name=f"heartbeat {job_id}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
