"""Benchmark: distributed mode with one and with two `stembot worker` processes.

A throwaway PostgreSQL (database and queue) and a moto S3 server run on loopback; the
bot's side is the real `Dispatcher` with its `QueueExecution` in this process (no Discord:
the notifier only records when each job was delivered); the workers are real `stembot worker` processes
with the tiny test model on the CPU. The same jobs (distinct audio, so the results cache
never answers) run with 1 worker, then 2. Prints jobs per minute and their ratio, and
the dispatch latency: from the bot queueing a job to a worker starting it (procrastinate's
own `deferred` and `started` events), and from the job's admission to that start.

    python bench/workers.py --jobs 8 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text

from core.db import make_engine, make_sessions
from core.distributed.fleet import Fleet
from core.distributed.queue import JobQueue
from core.distributed.queue_execution import QueueExecution
from core.jobs.dispatcher import Dispatcher, DispatcherConfig
from core.jobs.job import JobState
from core.jobs.store import JobStore
from core.storage.s3_client import S3Client, S3Config
from core.storage.s3_storage import S3Storage
from tests.support.media import music
from tests.support.models import save_th, tiny_htdemucs
from tests.support.postgres import reset_database, temporary_server
from tests.support.s3 import temporary_s3


class Recorder:
    """The notifier: remembers when each job was delivered or ended."""

    def __init__(self):
        self.delivered: dict[int, float] = {}
        self.ended: dict[int, str] = {}

    async def job_changed(self, job) -> None:
        return None

    async def deliver(self, job) -> None:
        self.delivered[job.id] = time.monotonic()

    async def job_ended(self, job) -> None:
        self.ended[job.id] = job.error or job.state


def worker_env(url: str, model_dir: Path, data_dir: Path, name: str, threads: int = 0) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STEMBOT_"))}
    return {**clean, "STEMBOT_QUEUE": "postgres", "STEMBOT_DATABASE_URL": url, "STEMBOT_MODEL": "tiny",
            "STEMBOT_MODEL_DIR": str(model_dir), "STEMBOT_SHIFTS": "0", "STEMBOT_DEVICE": "cpu",
            "STEMBOT_WORKER_NAME": name, "STEMBOT_DATA_DIR": str(data_dir / name),
            **({"STEMBOT_THREADS": str(threads)} if threads else {})}


async def run_round(workers: int, songs: list[Path], url: str, s3: str, model_dir: Path, work: Path,
                    prefetch: int) -> dict:
    reset_database_async = asyncio.to_thread(reset_database, url)
    await reset_database_async
    env = worker_env(url, model_dir, work, "migrate")
    subprocess.run([sys.executable, "-m", "stembot", "db", "upgrade"], env=env, check=True, capture_output=True)
    procs = []
    # Workers on one machine share its cores (as an operator sets STEMBOT_THREADS).
    threads = max(1, (os.cpu_count() or 1) // workers)
    for i in range(workers):
        log = open(work / f"worker{workers}-{i}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "stembot", "worker"], stdout=log, stderr=log,
                                      env=worker_env(url, model_dir, work, f"w{i}", threads),
                                      start_new_session=True))
    engine = make_engine(url)
    sessions = make_sessions(engine)
    store, fleet, queue = JobStore(sessions), Fleet(sessions), JobQueue(url)
    bucket = f"bench-{random.randrange(1 << 30)}"
    storage = S3Storage(work / "bot", S3Client(S3Config(bucket=bucket, endpoint_url=s3, access_key_id="bench",
                                                               secret_access_key="bench")),
                            max_transfer_ttl_s=3600)
    recorder = Recorder()
    dispatcher = Dispatcher(store, storage, recorder, QueueExecution(queue, fleet, prefetch=prefetch),
                            DispatcherConfig(worker_name="bot"))
    try:
        while await fleet.ready_slots() < workers:
            await asyncio.sleep(0.2)
        await storage.start()
        await queue.open()
        await dispatcher.start()
        started = time.monotonic()
        ids = []
        for i, song in enumerate(songs):
            job = await store.create(user_id=1000 + i, guild_id=1, source_kind="attachment",
                                     source_url="https://cdn.invalid/unused", source_name=song.name,
                                     model="tiny", stems="all", format="mp3")
            path = storage.input_path(job.id, job.source_name)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(song, path)  # already "fetched"
            ids.append(job.id)
        dispatcher.wake()
        while len(recorder.delivered) + len(recorder.ended) < len(ids):
            await asyncio.sleep(0.05)
        wall = max(recorder.delivered.values()) - started
        async with engine.connect() as connection:
            events = (await connection.execute(text(
                "SELECT j.args->>'job_id' AS job, e.type, e.at FROM procrastinate_events e "
                "JOIN procrastinate_jobs j ON j.id = e.job_id WHERE e.type IN ('deferred', 'started')"))).all()
            created = dict((await connection.execute(text("SELECT id, created_at FROM jobs"))).all())
        at: dict[tuple[str, str], object] = {(row.job, row.type): row.at for row in events}
        # In the order the workers started them.
        ids.sort(key=lambda i: at[(str(i), "started")])
        dispatch = [(at[(str(i), "started")] - at[(str(i), "deferred")]).total_seconds() for i in ids]
        admission = [(at[(str(i), "started")] - created[i]).total_seconds() for i in ids]
        states = await store.counts_by_state()
        # The first `workers` jobs started found every slot idle: their latency is the dispatch
        # itself; later ones also waited for a slot (or, prefetched, in the queue).
        return {"workers": workers, "prefetch": prefetch, "jobs": len(ids), "wall_s": wall,
                "jobs_per_min": 60 * len(ids) / wall, "failed": recorder.ended, "states": states,
                "idle_dispatch_ms": summary([d * 1000 for d in dispatch[:workers]]),
                "idle_admission_to_start_s": summary(admission[:workers]),
                "dispatch_ms": summary([d * 1000 for d in dispatch]),
                "admission_to_start_s": summary(admission)}
    finally:
        await dispatcher.stop()
        await queue.close()
        await storage.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        await engine.dispose()


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[max(0, round(0.95 * len(ordered)) - 1)],
            "max": ordered[-1]}


async def main_async(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="stembot-bench-workers-"))
    model_dir = work / "models"
    model_dir.mkdir()
    save_th(tiny_htdemucs(), model_dir, "tiny")
    songs = [music(work / f"song{i}.wav", seconds=args.seconds, tone=200.0 + 37.0 * i) for i in range(args.jobs)]
    results = []
    with temporary_server() as url, temporary_s3() as s3:
        for workers in args.workers:
            result = await run_round(workers, songs, url, s3, model_dir, work, args.prefetch)
            assert not result["failed"] and result["states"] == {JobState.done.value: args.jobs}, result
            results.append(result)
            print(f"{workers} worker(s), prefetch {args.prefetch}: {result['jobs']} jobs of {args.seconds:.0f} s "
                  f"in {result['wall_s']:.1f} s"
                  f" = {result['jobs_per_min']:.1f} jobs/min; to an idle worker: queued -> started max "
                  f"{result['idle_dispatch_ms']['max']:.0f} ms, admitted -> started max "
                  f"{result['idle_admission_to_start_s']['max']:.2f} s; all jobs: queued -> started p50 "
                  f"{result['dispatch_ms']['p50']:.0f} ms", flush=True)
    if len(results) == 2:
        print(f"ratio {results[1]['workers']} vs {results[0]['workers']} workers: "
              f"{results[1]['jobs_per_min'] / results[0]['jobs_per_min']:.2f}x jobs/min")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each song")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prefetch", type=int, default=1, help="jobs the bot prepares ahead of the free slots")
    parser.add_argument("--json", type=Path, default=None)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
