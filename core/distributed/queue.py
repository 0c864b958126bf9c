"""The job queue of distributed mode: procrastinate on PostgreSQL.

The queue carries one thing, "run stembot job N", from the bot to a `stembot worker`;
the job row stays the source of truth for everything else. What procrastinate gives:
one job at a time per worker slot (`concurrency=1`), priorities, aborting a running job
(its task is cancelled, via LISTEN/NOTIFY with a polling fallback), worker heartbeats
and the jobs of workers whose heartbeat stopped (retried here), and locks: a stembot job
is in the queue at most once (`queueing_lock`) and never runs twice at once (`lock`).
Why procrastinate: see docs/architecture.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import procrastinate
from procrastinate import exceptions as pq_errors
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

TASK = "stembot.separate"
QUEUE = "separate"

# Procrastinate logs every job start with its arguments at INFO; they hold only a job id,
# but keep its chatter out of the service logs unless asked for.
logging.getLogger("procrastinate").setLevel(logging.WARNING)


def conninfo(database_url: str) -> str:
    """A libpq connection string from a SQLAlchemy URL (postgresql+asyncpg://...)."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise ValueError("the job queue needs PostgreSQL (STEMBOT_DATABASE_URL=postgresql+asyncpg://...)")
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def make_app(database_url: str) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=conninfo(database_url), min_size=1, max_size=4))

    @app.task(name=TASK, queue=QUEUE, pass_context=True)
    async def separate(context: procrastinate.JobContext, job_id: int) -> str:
        # Each worker slot passes its own runner (its own model host) in the context.
        run: Callable[[int], Awaitable[object]] = context.additional_context["run"]
        outcome = await run(job_id)
        return str(getattr(outcome, "value", outcome))

    return app


def lock_name(job_id: int) -> str:
    return f"stembot-job-{int(job_id)}"


class JobQueue:
    """The bot's side of the queue: hand jobs over, abort them, watch the workers' jobs."""

    def __init__(self, database_url: str | None = None, app: procrastinate.App | None = None):
        if app is None:
            if database_url is None:
                raise ValueError("JobQueue needs a database URL or an app")
            app = make_app(database_url)
        self.app = app

    async def open(self) -> None:
        await self.app.connector.open_async()

    async def close(self) -> None:
        await self.app.connector.close_async()

    async def enqueue(self, job_id: int, priority: int) -> int | None:
        """Queue job `job_id`; None when it is queued already. Stembot's lower priority
        numbers run first; procrastinate runs higher numbers first."""
        lock = lock_name(job_id)
        try:
            return await self.app.configure_task(TASK, priority=-priority, lock=lock,
                                                 queueing_lock=lock).defer_async(job_id=int(job_id))
        except pq_errors.AlreadyEnqueued:
            return None

    async def abort(self, queue_job_id: int) -> None:
        """Withdraw a waiting job, or have its worker cancel it at once."""
        try:
            await self.app.job_manager.cancel_job_by_id_async(int(queue_job_id), abort=True)
        except pq_errors.ProcrastinateException:
            log.debug("queue job %s: nothing to abort", queue_job_id, exc_info=True)

    async def in_flight(self) -> int:
        """Jobs handed over and not finished: waiting for a worker, or running."""
        rows = await self.app.connector.execute_query_all_async(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE queue_name = %(queue)s "
            "AND status IN ('todo', 'doing')", queue=QUEUE)
        return int(rows[0]["n"])

    async def retry_stalled(self, stale_s: float) -> list[int]:
        """Put back the jobs of workers whose heartbeat stopped, for another worker to
        take over. Returns the stembot job ids."""
        retried = []
        for job in await self.app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=stale_s):
            try:
                await self.app.job_manager.retry_job(job)
            except pq_errors.ProcrastinateException:
                continue  # another process retried it first, or it just finished
            job_id = job.task_kwargs.get("job_id", 0)
            retried.append(job_id if isinstance(job_id, int) else 0)
        if retried:
            log.warning("jobs %s: their worker stopped answering; handed to another worker", retried)
        return retried

    async def forget_old(self, hours: float) -> None:
        """Delete the queue's records of jobs finished more than `hours` ago."""
        await self.app.job_manager.delete_old_jobs(nb_hours=max(1, round(hours)), queue=QUEUE, include_failed=True,
                                                  include_cancelled=True, include_aborted=True)
