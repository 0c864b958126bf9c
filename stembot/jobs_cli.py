"""`stembot jobs list|show|retry|fail`: the operator's tools for stuck or failed jobs.

Never prints a secret: not the interaction's token, not the presigned URLs of a job's
transfer, not the query of a source link (Discord's attachment links are signed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from core.jobs.job_state import RUNNING, UNFINISHED, JobState
from core.settings import Settings, get_settings

# The database, queue and storage load when a `jobs` command runs, not for every command's
# parser (`stembot separate` does not need them: docs/performance.md, start-up).
if TYPE_CHECKING:
    from core.jobs.job import Job
    from core.ops.bot_lock import BotLock
    from core.runtime import Runtime

DEFAULT_REASON = "stopped by the operator"


def add_parser(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser("jobs", help="list, show, retry or fail jobs (stuck or failed ones)")
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the newest jobs, one line each")
    listing.add_argument("--state", choices=[s.value for s in JobState], default=None, help="only jobs in this state")
    listing.add_argument("--limit", type=_count, default=20, metavar="N", help="at most N jobs (default 20)")
    listing.set_defaults(handler=cmd_list)
    show = actions.add_parser("show", help="one job's fields and timeline")
    show.add_argument("job_id", type=int, metavar="ID")
    show.set_defaults(handler=cmd_show)
    retry = actions.add_parser(
        "retry", help="put a failed job, or one stuck in a running state, back in the queue",
        description="The job goes back to `queued`; its attempt count is kept (the next run counts one more), so "
                    "a run of it still under way can no longer write it. A failed job takes its slot again.")
    retry.add_argument("job_id", type=int, metavar="ID")
    retry.set_defaults(handler=cmd_retry)
    fail = actions.add_parser(
        "fail", help="end an unfinished job as failed, release its quota and delete its files")
    fail.add_argument("job_id", type=int, metavar="ID")
    fail.add_argument("--reason", default=DEFAULT_REASON, help=f'what the user is told (default "{DEFAULT_REASON}")')
    fail.set_defaults(handler=cmd_fail)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _run(action: Callable[[Settings, Runtime], Awaitable[int]]) -> int:
    from core.runtime import Runtime  # noqa: PLC0415 - the database and storage load only for a jobs command

    settings = get_settings()

    async def go() -> int:
        runtime = Runtime.from_settings(settings)
        try:
            return await action(settings, runtime)
        finally:
            await runtime.close()

    return asyncio.run(go())


# -- reading ----------------------------------------------------------------------------


def cmd_list(args, parser) -> int:
    state = JobState(args.state) if args.state else None

    async def action(settings: Settings, runtime: Runtime) -> int:
        from core.db import utcnow  # noqa: PLC0415 - as Runtime in _run
        from core.jobs.job_report import age, short  # noqa: PLC0415 - as Runtime in _run

        jobs = await runtime.store.latest(state, args.limit)
        now = utcnow()
        print(f"{'ID':>7} {'STATE':10} {'AGE':>5} {'USER':>20} {'SERVER':>20} {'MODEL':14} {'STEMS':16} "
              f"{'ATT':>3} {'WORKER':20} ERROR")
        for job in jobs:
            print(f"{job.id:>7} {job.state:10} {age(job.created_at, now):>5} {job.user_id:>20} "
                  f"{job.guild_id or 'DM':>20} {short(job.model, 14):14} {short(job.stems, 16):16} "
                  f"{job.attempts:>3} {short(job.worker, 20):20} {short(job.error)}")
        if not jobs:
            print("no jobs" + (f" in state {state.value}" if state else ""))
        return 0

    return _run(action)


def cmd_show(args, parser) -> int:
    async def action(settings: Settings, runtime: Runtime) -> int:
        from core.jobs.job_report import describe  # noqa: PLC0415 - as Runtime in _run

        job = await runtime.store.get(args.job_id)
        if job is None:
            return _error(f"no job {args.job_id}")
        for name, value in describe(job):
            print(f"{name + ':':19} {value}")
        return 0

    return _run(action)


# -- changing ---------------------------------------------------------------------------


def _distributed(settings: Settings) -> bool:
    return settings.queue == "postgres"


async def _abort_queue_job(settings: Settings, job: Job) -> None:
    """Distributed mode: withdraw the job's hand-over, or have its worker stop it."""
    if not _distributed(settings) or job.queue_job_id is None:
        return
    from core.distributed.queue import JobQueue  # noqa: PLC0415 - as Runtime in _run

    queue = JobQueue(settings.resolved_database_url)
    await queue.open()
    try:
        await queue.abort(job.queue_job_id)
    finally:
        await queue.close()


async def _bot_lock(settings: Settings) -> BotLock | None:
    """The bot lock if no bot holds it (held until released: no bot starts meanwhile), else None."""
    from core.ops.bot_lock import AnotherBotRunning, BotLock  # noqa: PLC0415 - as Runtime in _run

    lock = BotLock(settings.resolved_database_url)
    try:
        await lock.acquire()
    except AnotherBotRunning:
        return None
    return lock


def cmd_retry(args, parser) -> int:
    async def action(settings: Settings, runtime: Runtime) -> int:
        job = await runtime.store.get(args.job_id)
        if job is None:
            return _error(f"no job {args.job_id}")
        if job.job_state not in (*RUNNING, JobState.failed):
            return _error(f"job {job.id} is {job.state}: only a failed job, or one in a running state "
                          f"({', '.join(s.value for s in RUNNING)}), can be retried")
        lock = None if _distributed(settings) else await _bot_lock(settings)
        try:
            if not _distributed(settings) and lock is None and job.job_state in RUNNING:
                # Embedded mode: the bot runs the job in its own process, where it keeps its
                # seat; its start-up puts the jobs it was running back in the queue.
                return _error(f"job {job.id} is {job.state} in the running bot's own process (embedded mode): "
                              "restart the bot instead, it puts the jobs it was running back in the queue")
            was = await runtime.store.retry(job.id)
            if was is None:
                return _error(f"job {job.id} changed meanwhile; look again with `stembot jobs show {job.id}`")
            await _abort_queue_job(settings, job)
        finally:
            if lock is not None:
                await lock.release()
        print(f"job {job.id}: {was.value} -> queued (attempts so far: {job.attempts})")
        return 0

    return _run(action)


def cmd_fail(args, parser) -> int:
    reason = " ".join(args.reason.split())
    if not reason:
        parser.error("--reason must not be empty")

    async def action(settings: Settings, runtime: Runtime) -> int:
        job = await runtime.store.get(args.job_id)
        if job is None:
            return _error(f"no job {args.job_id}")
        if job.job_state not in UNFINISHED:
            return _error(f"job {job.id} is {job.state} already: only an unfinished job can be failed")
        lock = None if _distributed(settings) else await _bot_lock(settings)
        try:
            if not _distributed(settings) and lock is None:
                # Embedded mode has no watcher of rows other processes change: the running
                # bot would neither tell the user nor stop its run of the job.
                return _error("a bot is running on this database in embedded mode, and it would not notice: "
                              "stop it first (the user's status message then stays as it was)")
            if not await runtime.store.fail_by_operator(job.id, reason):
                return _error(f"job {job.id} changed meanwhile; look again with `stembot jobs show {job.id}`")
            await _abort_queue_job(settings, job)
            from core.storage.s3_storage import S3Storage  # noqa: PLC0415 - as Runtime in _run

            storage = runtime.storage
            if isinstance(storage, S3Storage):
                await storage.start()
            await storage.delete_job(job.id)
        finally:
            if lock is not None:
                await lock.release()
        told = ("a running bot tells the user" if _distributed(settings)
                else "no bot was running: the user's status message stays as it was")
        print(f"job {job.id}: {job.state} -> failed ({reason}); slot and minutes released, files deleted; {told}")
        return 0

    return _run(action)
