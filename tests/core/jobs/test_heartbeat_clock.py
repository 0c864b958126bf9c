"""A run's heartbeat is written and judged on the database's clock: a worker whose own clock
is off is neither taken for dead while it beats nor kept alive once it stops. The worker's
clock is skewed for real: its side runs in a process under libfaketime (Debian's `faketime`),
on a real PostgreSQL server, as in tests/core/distributed/test_fleet.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import textwrap

import pytest

from core.jobs.job import JobState
from core.jobs.store import Recovered
from core.jobs.sweeper import Sweeper
from core.storage.local import LocalStorage
from tests.support.quota_db import admit, open_db

needs_faketime = pytest.mark.skipif(shutil.which("faketime") is None and not os.environ.get("CI"),
                                    reason="faketime is not installed (scripts/test installs it)")

STALE_S = 2.0  # the run beats every 0.5 s
BEATING_S = 3.0  # longer than STALE_S: a heartbeat read on the wrong clock shows


def worker_code(url: str, job_id: int) -> str:
    """A worker's run: it takes the job, heartbeats for BEATING_S, then stops (as a worker
    that died would: the job stays where it was)."""
    return textwrap.dedent(f"""
        import asyncio
        from core.db import make_engine, make_sessions
        from core.jobs.runner import JobRunner, RunConfig
        from core.jobs.store import JobStore

        async def main():
            engine = make_engine({url!r})
            store = JobStore(make_sessions(engine))
            job, lease = await store.take({job_id}, "w1")
            # The heartbeat under test needs no model host: nothing fences the run out here.
            runner = JobRunner(store, host=None, files=None, worker_name="w1", config=RunConfig(stale_s={STALE_S}))
            async with runner._heartbeats(job.id, lease):
                print("beating", flush=True)
                await asyncio.sleep({BEATING_S})
            await engine.dispose()

        asyncio.run(main())
    """)


@needs_faketime
@pytest.mark.parametrize("skew", ["-60s", "+60s"])
async def test_a_run_with_a_skewed_clock_is_taken_back_only_once_it_stops_beating(migrated, tmp_path, skew):
    async with open_db(migrated) as db:
        store = db.store()
        sweeper = Sweeper(store, LocalStorage(tmp_path / "files"), 3600.0, stale_s=STALE_S)
        await admit(store)
        job = await store.claim_next("bot")
        worker = await asyncio.create_subprocess_exec(
            "faketime", "-f", skew, sys.executable, "-c", worker_code(migrated, job.id),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert worker.stdout is not None
            assert await asyncio.wait_for(worker.stdout.readline(), 60) == b"beating\n"
            while worker.returncode is None:  # the worker beats: its job stays
                assert await sweeper.recover_stale() == []
                assert (await store.require(job.id)).job_state is JobState.decoding
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.wait(), 0.25)
            assert worker.returncode == 0, (await worker.stderr.read()).decode() if worker.stderr else ""
            # Silent now: taken back once its last heartbeat is STALE_S old (on the database's clock).
            recovered: list[Recovered] = []
            async with asyncio.timeout(STALE_S + 3):
                while not recovered:
                    await asyncio.sleep(0.25)
                    recovered = await sweeper.recover_stale()
            assert recovered == [Recovered(job.id, JobState.queued, None)]
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
