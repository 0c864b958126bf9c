"""Benchmark: what one finished job costs the bot's event loop with a long queue.

10,000 queued jobs over 500 servers (plus a day of served jobs), each with a status
message; `--live` of them still have a usable interaction token (the others' 15 minutes
are over). One job finishes: the next is claimed, and every status message that shows a
place is redrawn the way the bot does it (its place from `JobStore.queue_snapshot`, the text
from `render_status`; an edit is counted when the text changed).

- new: `JobStore` of this tree: the jobs to redraw come from `queued_to_show`, the places
  from one shared computation (`QueueBoard`).
- old: `JobStore` of git `--old-ref` (default 25ec167, before the queue board), loaded from git beside the new one:
  every queued job (`unfinished`) is redrawn, each redraw computing the whole fair order.
  It is measured on `--old-sample` redraws and the total extrapolated (all of them take
  minutes).

Measured: event-loop lag (a 5 ms ticker's overshoot) while the completion is processed,
the time of a `/queue`-like snapshot, and SQL statements per completion (a SQLAlchemy
event listener on the engine).

    python bench/queue_scale.py                      # SQLite in a temporary folder
    python bench/queue_scale.py --postgres           # a throwaway PostgreSQL server
    python bench/queue_scale.py --url postgresql+asyncpg://...   # an empty database
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import event

from bot.exts.split._status import StatusView, render_status
from core.db import make_engine, make_sessions, upgrade, utcnow
from core.jobs.job import InteractionToken, Job, JobState
from core.jobs.store import JobStore

FIELDS = dict(source_kind="attachment", source_url="https://cdn.example/a.mp3", source_name="a.mp3",
              model="htdemucs", stems="all", format="mp3", attachment_size_limit=10 << 20)


def old_store_class(ref: str) -> type:
    """`JobStore` as it is at git `ref`, imported under another module name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:core/jobs/store.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_store", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_store"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.JobStore


async def fill(sessions, queued: int, servers: int, live: int, served: int) -> None:
    now = utcnow()
    async with sessions() as session:
        for k in range(served):  # a day of history: who was served when
            started = now - timedelta(seconds=80_000 * (k + 1) / served)
            session.add(Job(**FIELDS, user_id=k % 3000, guild_id=k % servers, state=JobState.done.value,
                            created_at=started, started_at=started, finished_at=started))
        for k in range(queued):
            expires = now + (timedelta(minutes=10) if k >= queued - live else timedelta(minutes=-10))
            session.add(Job(**FIELDS, user_id=k % 3000, guild_id=k % servers, status_message_id=10_000 + k,
                            created_at=now - timedelta(seconds=queued - k),
                            interaction=InteractionToken(token=f"tok{k}", expires_at=expires)))
        await session.commit()


class Ticker:
    """How late a 5 ms sleep wakes up: the event loop's lag while something runs on it."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.append(time.perf_counter() - start - 0.005)

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()

    def p99_ms(self) -> float:
        lags = sorted(self.lags) or [0.0]
        return lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000


async def redraw(store, job: Job, texts: dict[int, str]) -> bool:
    """What `DiscordNotifier._render` and the StatusBoard do for one job: True if it edits."""
    snapshot = await store.queue_snapshot(job.id)
    text = render_status(job, StatusView(snapshot.position, snapshot.length))
    changed = texts.get(job.id) != text
    texts[job.id] = text
    return changed


async def completion(store, jobs_of, sample: int | None, texts: dict[int, str]) -> dict:
    """One finished job: claim the next, then redraw (up to `sample` of) the jobs to redraw."""
    with Ticker() as ticker:
        start = time.perf_counter()
        await store.claim_next("bench")
        jobs = await jobs_of()
        chosen = jobs if sample is None else jobs[:sample]
        edits = sum(await asyncio.gather(*(redraw(store, job, texts) for job in chosen)))
        seconds = time.perf_counter() - start
    return dict(redraws=len(jobs), measured=len(chosen), edits=edits, seconds=seconds, lag_p99_ms=ticker.p99_ms(),
                lag_max_ms=max(ticker.lags or [0.0]) * 1000)


async def run(url: str, args) -> None:
    engine = make_engine(url)
    statements = 0

    def count(*_args) -> None:
        nonlocal statements
        statements += 1

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    sessions = make_sessions(engine)
    await fill(sessions, args.jobs, args.servers, args.live, args.served)
    print(f"{args.jobs} queued jobs over {args.servers} servers ({args.live} with a live token), "
          f"{args.served} served in the last day; {url.split(':')[0]}")

    new = JobStore(sessions)
    texts: dict[int, str] = {}
    for job in await new.queued_to_show():  # the texts shown before the completion
        await redraw(new, job, texts)
    statements = 0
    result = await completion(new, new.queued_to_show, None, texts)
    result["statements"] = statements
    print(f"new: {result}  order computations: {new.board.computations}")

    times = []
    for job in (await new.queued_to_show())[:20]:
        new.board.changed()  # a /queue right after a change: the order is computed
        start = time.perf_counter()
        await new.queue_snapshot(job.id)
        times.append(time.perf_counter() - start)
    print(f"new: /queue snapshot after a change {statistics.median(times) * 1000:.1f} ms (median of 20); "
          f"cached {await _cached_ms(new):.3f} ms")

    if args.old_ref:
        old = old_store_class(args.old_ref)(sessions)

        async def unfinished_queued() -> list[Job]:
            return [job for job in await old.unfinished() if job.job_state is JobState.queued]

        statements = 0
        result = await completion(old, unfinished_queued, args.old_sample, {})
        result["statements"] = statements
        per = result["seconds"] / max(result["measured"], 1)
        print(f"old ({args.old_ref}): {result}")
        print(f"old: {per * 1000:.1f} ms per redraw -> about {per * result['redraws']:.0f} s and "
              f"{statements / max(result['measured'], 1) * result['redraws']:.0f} statements for all "
              f"{result['redraws']} redraws (extrapolated)")
        start = time.perf_counter()
        snapshot = await old.queue_snapshot(1)
        print(f"old: /queue snapshot {(time.perf_counter() - start) * 1000:.1f} ms (length seen {snapshot.length})")
    await engine.dispose()


async def _cached_ms(store) -> float:
    await store.queue_snapshot(1)
    start = time.perf_counter()
    for job_id in range(1000):
        await store.queue_snapshot(job_id)
    return (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--servers", type=int, default=500)
    parser.add_argument("--live", type=int, default=1_000, help="queued jobs whose token is still usable")
    parser.add_argument("--served", type=int, default=5_000, help="jobs started in the last day")
    parser.add_argument("--url", help="an empty database (default: SQLite in a temporary folder)")
    parser.add_argument("--postgres", action="store_true",
                        help="a throwaway PostgreSQL server of the machine (tests/support/postgres.py)")
    # The last commit before the queue board (0d0f626 merged it).
    parser.add_argument("--old-ref", default="25ec167", help="git ref of the old store ('' to skip it)")
    parser.add_argument("--old-sample", type=int, default=100)
    args = parser.parse_args()
    if args.postgres:
        from tests.support.postgres import temporary_server
        with temporary_server() as url:
            upgrade(url)
            asyncio.run(run(url, args))
        return
    with tempfile.TemporaryDirectory() as folder:
        url = args.url or f"sqlite+aiosqlite:///{folder}/queue.db"
        upgrade(url)  # Alembic runs its own event loop
        asyncio.run(run(url, args))


if __name__ == "__main__":
    main()
