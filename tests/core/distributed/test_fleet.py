"""core.distributed.fleet: worker liveness on the database's clock. The workers' clocks are
skewed for real: the worker side runs in a process under libfaketime (Debian's `faketime`)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from core.db import make_engine, make_sessions
from core.distributed.fleet import Fleet

needs_faketime = pytest.mark.skipif(shutil.which("faketime") is None and not os.environ.get("CI"),
                                    reason="faketime is not installed (scripts/test installs it)")


def beat_with_a_skewed_clock(url: str, skew: str, name: str = "w/cpu") -> None:
    """A worker process whose clock is off by `skew` (e.g. "-60s") refreshes its slot."""
    code = textwrap.dedent(f"""
        import asyncio
        from core.db import make_engine, make_sessions
        from core.distributed.fleet import Fleet

        async def main():
            engine = make_engine({url!r})
            await Fleet(make_sessions(engine)).beat({name!r}, host="h", pid=1, device="cpu", model="tiny",
                                                    state="ready", job_id=None)
            await engine.dispose()

        asyncio.run(main())
    """)
    done = subprocess.run(["faketime", "-f", skew, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@needs_faketime
async def test_a_worker_whose_clock_runs_behind_is_alive(migrated):
    engine = make_engine(migrated)
    try:
        fleet = Fleet(make_sessions(engine), stale_s=30.0)
        await asyncio.to_thread(beat_with_a_skewed_clock, migrated, "-60s")
        assert await fleet.ready_slots() == 1
        (slot,) = await fleet.slots()
        assert slot.seen_s_ago < 10
    finally:
        await engine.dispose()


@needs_faketime
async def test_a_worker_whose_clock_runs_ahead_is_dead_once_silent(migrated):
    engine = make_engine(migrated)
    try:
        fleet = Fleet(make_sessions(engine), stale_s=2.0)
        await asyncio.to_thread(beat_with_a_skewed_clock, migrated, "+60s")
        assert await fleet.ready_slots() == 1
        await asyncio.sleep(2.5)
        assert await fleet.ready_slots() == 0
        assert len(await fleet.slots(include_stale=True)) == 1
        assert await fleet.forget_stale(older_than_s=1.0) == 1
        assert await fleet.slots(include_stale=True) == []
    finally:
        await engine.dispose()
