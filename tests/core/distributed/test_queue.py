"""The job queue (procrastinate) on a real PostgreSQL: order, locks, aborts, stalled workers."""

from __future__ import annotations

import pytest
import pytest_asyncio

from core.distributed.queue import QUEUE, JobQueue, conninfo
from core.distributed.queue_schema import install_schema, schema_installed


@pytest.fixture
def empty_postgres(postgres_server):
    from tests.support.postgres import reset_database

    reset_database(postgres_server)  # runs its own event loop: a sync fixture
    return postgres_server


@pytest_asyncio.fixture
async def queue(empty_postgres):
    assert await install_schema(empty_postgres)
    assert not await install_schema(empty_postgres)  # a second time changes nothing
    jobs = JobQueue(empty_postgres)
    await jobs.open()
    yield jobs
    await jobs.close()


async def fetch(queue: JobQueue, worker_id: int):
    return await queue.app.job_manager.fetch_job(queues=[QUEUE], worker_id=worker_id)


def test_conninfo_is_libpq_and_refuses_other_databases():
    assert conninfo("postgresql+asyncpg://u:p%40ss@db:5433/stembot") == "postgresql://u:p%40ss@db:5433/stembot"
    with pytest.raises(ValueError, match="PostgreSQL"):
        conninfo("sqlite+aiosqlite:///x.sqlite3")


async def test_schema_is_reported_missing_until_installed(empty_postgres):
    assert not await schema_installed(empty_postgres)
    await install_schema(empty_postgres)
    assert await schema_installed(empty_postgres)


async def test_interactive_jobs_go_before_bulk_and_each_priority_in_order(queue):
    bulk = await queue.enqueue(1, priority=1)
    first = await queue.enqueue(2, priority=0)
    second = await queue.enqueue(3, priority=0)
    assert await queue.in_flight() == 3
    worker = await queue.app.job_manager.register_worker()
    order = [(await fetch(queue, worker)).id for _ in range(3)]
    assert order == [first, second, bulk]
    assert await fetch(queue, worker) is None
    assert await queue.in_flight() == 3  # running ones count too


async def test_a_job_is_in_the_queue_once(queue):
    assert await queue.enqueue(5, priority=0) is not None
    assert await queue.enqueue(5, priority=0) is None
    assert await queue.in_flight() == 1


async def test_abort_withdraws_a_waiting_job_and_flags_a_running_one(queue):
    waiting = await queue.enqueue(1, priority=0)
    running = await queue.enqueue(2, priority=0)
    worker = await queue.app.job_manager.register_worker()
    assert (await fetch(queue, worker)).id == waiting  # oldest first
    # Swap roles: `waiting` now runs; the other still waits.
    running, waiting = waiting, running
    await queue.abort(waiting)
    await queue.abort(running)
    await queue.abort(999_999)  # unknown: no error
    statuses = {job.id: job.status for job in await queue.app.job_manager.list_jobs_async()}
    assert statuses[waiting] == "cancelled"
    assert running in await queue.app.job_manager.list_jobs_to_abort_async()


async def test_a_silent_workers_job_goes_back_to_the_queue(queue):
    job = await queue.enqueue(7, priority=0)
    alive = await queue.app.job_manager.register_worker()
    silent = await queue.app.job_manager.register_worker()
    assert (await fetch(queue, silent)).id == job
    assert await queue.retry_stalled(stale_s=30) == []  # still beating
    await queue.app.connector.execute_query_async(
        "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = %(id)s", id=silent)
    assert await queue.retry_stalled(stale_s=30) == [7]
    assert await queue.retry_stalled(stale_s=30) == []  # once
    retaken = await fetch(queue, alive)
    assert retaken.id == job and retaken.task_kwargs == {"job_id": 7}
