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
import gc
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

from sqlalchemy import event, insert

from bot.exts.split._status import StatusView, render_status
from core.db import make_engine, make_sessions, upgrade, utcnow
from core.jobs.dispatcher import AttachedBackend, Dispatcher
from core.jobs.job import InteractionToken, Job, JobState
from core.jobs.store import JobStore, editable_queued, expired_history, queued_oldest_first, served_lately
from core.ops.looplag import freeze_start_up_heap
from core.storage.local import LocalStorage

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


async def fill(sessions, queued: int, servers: int, live: int, served: int, history: int) -> None:
    now = utcnow()
    async with sessions() as session:
        # Older history: jobs that ended 1 to 30 days ago, files deleted (what the job
        # history keeps; the queries of a completion must not read them).
        for start in range(0, history, 5000):
            rows = []
            for k in range(start, min(history, start + 5000)):
                ended = now - timedelta(days=1 + 29 * (k + 1) / history)
                rows.append(dict(**FIELDS, user_id=k % 3000, guild_id=k % servers, state=JobState.done.value,
                                 created_at=ended, started_at=ended, finished_at=ended, artifacts_deleted_at=ended))
            await session.execute(insert(Job), rows)
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


class Redraws:
    """The dispatcher's notifier here: for each queued job shown, what `DiscordNotifier`
    and its StatusBoard do (its place, its text; an edit counted when the text changed)."""

    def __init__(self, store, texts: dict[int, str]) -> None:
        self.store, self.texts, self.edits = store, texts, 0

    async def job_changed(self, job: Job) -> None:
        changed = await redraw(self.store, job, self.texts)  # awaited first: `+=` would read edits before
        self.edits += changed

    async def deliver(self, job: Job) -> None:
        return None

    async def job_ended(self, job: Job) -> None:
        return None


class NoExecution(AttachedBackend):
    """No jobs run here: only the dispatcher's redraws are measured."""


async def completion(side: Side) -> dict:
    """One finished job: claim the next, then redraw the jobs to redraw (a sample of them
    for a store before the queue board), the way that version of the bot does."""
    store, notifier = side.store, Redraws(side.store, side.texts)
    with Ticker() as ticker:
        start = time.perf_counter()
        await store.claim_next("bench")
        jobs = await side.to_redraw()
        chosen = jobs[:side.sample] if side.legacy else jobs
        if side.name == "new":  # `EmbeddedExecution`: the order first, then the redraws in steps
            dispatcher = Dispatcher(store, LocalStorage(Path(tempfile.gettempdir())), notifier, NoExecution())
            await dispatcher.show_places(chosen)
            await asyncio.gather(*dispatcher._background)
        else:  # before: every redraw started at once
            await asyncio.gather(*(notifier.job_changed(job) for job in chosen))
        seconds = time.perf_counter() - start
    return dict(redraws=len(jobs), measured=len(chosen), edits=notifier.edits, seconds=seconds,
                lag_p99_ms=ticker.p99_ms(), lag_max_ms=max(ticker.lags or [0.0]) * 1000)


class Side:
    """One store under test: how it redraws after a completion, and whether the heap is
    frozen while it runs (as the bot of that version does after start-up)."""

    def __init__(self, name: str, store, frozen: bool, sample: int) -> None:
        self.name, self.store, self.frozen, self.sample = name, store, frozen, sample
        self.texts: dict[int, str] = {}
        self.results: list[dict] = []
        self.queue_ms: list[float] = []
        # A store before the queue board (25ec167) redraws every queued job, each computing
        # the whole order: measured on `sample` of them and extrapolated.
        self.legacy = not hasattr(store, "queued_to_show")

    async def to_redraw(self) -> list[Job]:
        if self.legacy:
            return [job for job in await self.store.unfinished() if job.job_state is JobState.queued]
        return await self.store.queued_to_show()

    def heap(self) -> None:
        if self.frozen:
            freeze_start_up_heap()
        else:
            gc.unfreeze()


async def run(url: str, args) -> None:
    engine = make_engine(url)
    statements = 0

    def count(*_args) -> None:
        nonlocal statements
        statements += 1

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    sessions = make_sessions(engine)
    await fill(sessions, args.jobs, args.servers, args.live, args.served, args.history)
    kind = url.split(":")[0]
    print(f"{args.jobs} queued jobs over {args.servers} servers ({args.live} with a live token), "
          f"{args.served} served in the last day, {args.history} in the 29 days before; {kind}")
    await explain(engine)

    sides = [Side("new", JobStore(sessions), frozen=True, sample=args.old_sample)]
    if args.old_ref:
        sides.insert(0, Side(f"old ({args.old_ref})", old_store_class(args.old_ref)(sessions), frozen=False,
                             sample=args.old_sample))
    for side in sides:  # the texts shown before the first completion
        if not side.legacy:
            for job in await side.to_redraw():
                await redraw(side.store, job, side.texts)
    for _ in range(args.rounds):  # alternating, on the same database
        for side in sides:
            side.heap()
            statements = 0
            result = await completion(side)
            result["statements"] = statements
            side.results.append(result)
            print(f"{side.name}: {result}")
            for job in (await side.to_redraw())[:10]:
                if side.legacy:
                    start = time.perf_counter()
                    await side.store.queue_snapshot(job.id)
                else:
                    side.store.board.changed()  # a /queue right after a change: the order is computed
                    start = time.perf_counter()
                    await side.store.queue_snapshot(job.id)
                side.queue_ms.append((time.perf_counter() - start) * 1000)
    gc.unfreeze()
    print(f"\nper completion, {args.jobs:,} queued, {kind}, {args.rounds} rounds alternating "
          "(worst of the rounds; /queue: median and worst of 10 per round)")
    print(f"{'':34}" + "".join(f"{side.name:>22}" for side in sides))
    rows = [
        ("event-loop lag p99 (ms)", lambda side: f"{max(r['lag_p99_ms'] for r in side.results):.0f}"),
        ("event-loop lag worst (ms)", lambda side: f"{max(r['lag_max_ms'] for r in side.results):.0f}"),
        ("time to process it (s)", lambda side: _extrapolated(side, "seconds", "{:.2f}")),
        ("SQL statements", lambda side: _extrapolated(side, "statements", "{:.0f}")),
        ("messages redrawn / edited", lambda side: f"{side.results[-1]['redraws']} / "
                                                   f"{'?' if side.legacy else side.results[-1]['edits']}"),
        ("/queue after a change (ms)", lambda side: f"{statistics.median(side.queue_ms):.0f} "
                                                    f"(max {max(side.queue_ms):.0f})"),
    ]
    for label, value in rows:
        print(f"{label:34}" + "".join(f"{value(side):>22}" for side in sides))
    await engine.dispose()


def _extrapolated(side: Side, key: str, fmt: str) -> str:
    worst = max(r[key] for r in side.results)
    if not side.legacy:
        return fmt.format(worst)
    last = side.results[-1]
    return "~" + fmt.format(worst / max(last["measured"], 1) * last["redraws"]) + " (extrap.)"


async def explain(engine) -> None:
    """The query plans of what runs per completion and per sweep: each must use an index."""
    now = utcnow()
    queries = {
        "queued jobs, oldest first (fair order)": queued_oldest_first(),
        "served in the last day (fair order)": served_lately(now - timedelta(days=1)),
        "queued jobs whose message can be edited": editable_queued(now),
        "finished rows past their history (sweeper)": expired_history(now, 500),
    }
    postgres = engine.dialect.name == "postgresql"
    async with engine.connect() as connection:
        if postgres:
            await connection.exec_driver_sql("ANALYZE")
        for label, query in queries.items():
            sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
            plan = await connection.exec_driver_sql(("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + sql)
            lines = [row[0] if postgres else row[-1] for row in plan]
            print(f"plan: {label}\n    " + "\n    ".join(lines))


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
    parser.add_argument("--history", type=int, default=50_000, help="jobs that ended 1 to 30 days ago")
    parser.add_argument("--url", help="an empty database (default: SQLite in a temporary folder)")
    parser.add_argument("--postgres", action="store_true",
                        help="a throwaway PostgreSQL server of the machine (tests/support/postgres.py)")
    # Before the fair order in SQL age order and the frozen start-up heap (the queue board is
    # there: 25ec167 is the last commit before it).
    parser.add_argument("--old-ref", default="2f5e830", help="git ref of the old store ('' to skip it)")
    parser.add_argument("--rounds", type=int, default=2)
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
