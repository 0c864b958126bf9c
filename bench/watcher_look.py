"""Benchmark: one look of the distributed bot's watcher (`QueueExecution._look`, every 0.5 s)
with a long queue.

10,000 queued jobs over 500 servers (each with a status message, 1,000 with a live
interaction token; `bench/queue_scale.py`'s fill, with its history) and 8 jobs handed to
workers. Measured per look, for the watcher of git `--old-ref` (loaded from git beside this
tree's, on the same database, alternating) and this tree's:

- a quiet look: nothing changed since the last one;
- a busy look: one worker wrote its job's progress (8 workers writing every 2 s make about
  two such changes per 0.5-s look);
- an operator's look: `stembot jobs fail` ended a queued job (a change the new watcher
  cannot explain from what it reads, so it reads the queued ids again).

Reported: the look's time, the event loop's lag meanwhile (a 5 ms ticker's overshoot), SQL
statements, rows the database returned (the driver's count per SELECT; reads streamed in
partitions are not counted) and whole job rows the ORM built.

    python bench/watcher_look.py --postgres             # a throwaway PostgreSQL server
    python bench/watcher_look.py --url postgresql+asyncpg://...   # an empty database
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import event

from bench.queue_scale import Ticker, fill
from core.db import make_engine, make_sessions, upgrade
from core.distributed.fleet import Fleet
from core.distributed.queue_execution import QueueExecution
from core.jobs.dispatcher import Dispatcher, DispatcherConfig
from core.jobs.job import Job
from core.jobs.store import JobStore
from core.ops.looplag import freeze_start_up_heap
from core.storage.local import LocalStorage

CASES = ("quiet", "busy", "operator")


class Silent:
    async def job_changed(self, job: Job) -> None:
        return None

    async def deliver(self, job: Job) -> None:
        return None

    async def job_ended(self, job: Job) -> None:
        return None


def old_execution_class(ref: str) -> type:
    """`QueueExecution` as it is at git `ref`, imported under another module name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:core/distributed/queue_execution.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_queue_execution.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_queue_execution", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_queue_execution"] = module
    spec.loader.exec_module(module)
    return module.QueueExecution


class Counts:
    """Statements, rows returned and Job objects built, counted on the engine."""

    def __init__(self, engine) -> None:
        self.statements = self.rows = self.jobs = 0
        event.listen(engine.sync_engine, "after_cursor_execute", self._executed)
        event.listen(Job, "load", self._loaded)

    def _executed(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.statements += 1
        if statement.lstrip().upper().startswith("SELECT"):
            self.rows += max(cursor.rowcount, 0)

    def _loaded(self, target, context) -> None:
        self.jobs += 1

    def take(self) -> tuple[int, int, int]:
        taken = self.statements, self.rows, self.jobs
        self.statements = self.rows = self.jobs = 0
        return taken


async def hand_out(store: JobStore, worker_store: JobStore, running: int) -> list:
    """`running` jobs claimed by the bot, in the queue, taken by workers."""
    leases = []
    for k in range(running):
        job = await store.claim_next("bot")
        await store.update(job.id, queue_job_id=10_000 + k)
        taken = await worker_store.take(job.id, f"w{k}/cpu")
        assert taken is not None
        leases.append(taken)
    return leases


async def one_look(execution, counts: Counts) -> dict:
    counts.take()
    with Ticker() as ticker:
        start = time.perf_counter()
        await execution._look()
        seconds = time.perf_counter() - start
        await asyncio.sleep(0.01)  # the notifications it spawned run
    statements, rows, jobs = counts.take()
    return dict(ms=seconds * 1000, lag_max_ms=max(ticker.lags or [0.0]) * 1000, statements=statements, rows=rows,
                jobs=jobs)


async def run(url: str, args) -> None:
    engine = make_engine(url)
    sessions = make_sessions(engine)
    await fill(sessions, args.jobs, args.servers, args.live, args.served, args.history)
    store, workers = JobStore(sessions), JobStore(sessions)
    leases = await hand_out(store, workers, args.running)
    kind = url.split(":")[0]
    print(f"{args.jobs} queued jobs over {args.servers} servers, {args.running} handed to workers; {kind}")
    counts = Counts(engine)
    sides = {}
    classes = [("new", QueueExecution)]
    if args.old_ref:
        classes.insert(0, (f"old ({args.old_ref})", old_execution_class(args.old_ref)))
    for name, cls in classes:
        execution = cls(None, Fleet(sessions))  # no queue call in a look
        Dispatcher(store, LocalStorage(Path(tempfile.gettempdir()) / "watcher-bench"), Silent(), execution,
                   DispatcherConfig(worker_name="bot"))
        await execution.recover()  # what Dispatcher.start does before its loops
        for job in await store.unfinished():
            execution.resumed(job)
        await execution._look()
        sides[name] = (execution, {case: [] for case in CASES})
    freeze_start_up_heap()  # as the bot does after its start (both sides: main's bot does too)
    progress = 0.0
    queued = [job.id for job in await store.unfinished() if job.state == "queued"]
    for _ in range(args.rounds):  # alternating, on the same database
        for execution, results in sides.values():
            await execution._look()  # what the other side did meanwhile, not measured
            progress += 0.001
            job, lease = leases[0]
            await workers.update(job.id, lease=lease, progress=progress)
            results["busy"].append(await one_look(execution, counts))
            results["quiet"].append(await one_look(execution, counts))  # nothing changed since
            # An operator fails a queued job (`stembot jobs fail`): a change the new watcher
            # cannot explain, so it reads the queued ids again.
            await workers.fail_by_operator(queued.pop(), "bench")
            results["operator"].append(await one_look(execution, counts))
    print(f"\nper look, {args.jobs:,} queued, {args.running} running, {kind}, {args.rounds} rounds alternating "
          "(median; worst in brackets)")
    print(f"{'':28}" + "".join(f"{name + ', ' + case:>24}" for name in sides for case in CASES))
    for label, key in (("time of one look (ms)", "ms"), ("event-loop lag, worst (ms)", "lag_max_ms"),
                       ("SQL statements", "statements"), ("rows returned", "rows"), ("job rows loaded", "jobs")):
        cells = []
        for _, results in sides.values():
            for case in CASES:
                values = [r[key] for r in results[case]]
                cells.append(f"{statistics.median(values):.0f} ({max(values):.0f})")
        print(f"{label:28}" + "".join(f"{cell:>24}" for cell in cells))
    await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--servers", type=int, default=500)
    parser.add_argument("--live", type=int, default=1_000)
    parser.add_argument("--served", type=int, default=5_000)
    parser.add_argument("--history", type=int, default=50_000)
    parser.add_argument("--url", help="an empty PostgreSQL database")
    parser.add_argument("--postgres", action="store_true",
                        help="a throwaway PostgreSQL server of the machine (tests/support/postgres.py)")
    # The watcher that read every unfinished row (main before this change).
    parser.add_argument("--old-ref", default="7235405", help="git ref of the old watcher ('' to skip it)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.postgres:
        from tests.support.postgres import temporary_server
        with temporary_server() as url:
            upgrade(url)
            asyncio.run(run(url, args))
        return
    if not args.url:
        parser.error("--postgres or --url: distributed mode runs on PostgreSQL")
    upgrade(args.url)
    asyncio.run(run(args.url, args))


if __name__ == "__main__":
    main()
