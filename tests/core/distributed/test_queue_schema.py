"""procrastinate's tables through `stembot db upgrade` on a real PostgreSQL: installed on a
new database, migrated from an older procrastinate's schema to one equal to a fresh
install's, and a second upgrade changes nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from core.distributed.queue import QUEUE, JobQueue, conninfo
from core.distributed.queue_schema import INSTALLED, MIGRATIONS_TABLE, migrations, upgrade_queue_schema

SCHEMA_3_0_2 = Path(__file__).parents[2] / "support" / "procrastinate" / "schema-3.0.2.sql"
AFTER_3_0_2 = [m.name for m in migrations() if m.version > (3, 0, 2)]


@pytest.fixture
def empty_postgres(postgres_server):
    from tests.support.postgres import reset_database

    reset_database(postgres_server)
    return postgres_server


def db_upgrade(url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STEMBOT_"))}
    env = {**clean, "STEMBOT_DATABASE_URL": url, "STEMBOT_DATA_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "stembot", "db", "upgrade"], env=env, capture_output=True,
                          text=True, timeout=120)


async def sql(url: str, script: str) -> list[tuple]:
    async with await psycopg.AsyncConnection.connect(conninfo(url), autocommit=True) as connection:
        cursor = await connection.execute(script)  # type: ignore[arg-type]  # the test's own SQL
        return await cursor.fetchall() if cursor.description else []


async def queue_catalogue(url: str) -> dict[str, list]:
    """What the queue's schema is made of: functions and their arguments, the values of its
    types in order, tables and their columns, indexes, triggers."""
    return {
        "functions": await sql(url, "SELECT p.proname, pg_get_function_identity_arguments(p.oid) FROM pg_proc p "
                                    "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' "
                                    "AND p.proname LIKE 'procrastinate%' ORDER BY 1, 2"),
        "types": await sql(url, "SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
                                "WHERE t.typname LIKE 'procrastinate%' ORDER BY t.typname, e.enumsortorder"),
        "columns": await sql(url, "SELECT table_name, column_name, data_type, is_nullable, column_default "
                                  "FROM information_schema.columns WHERE table_schema = 'public' "
                                  "AND table_name LIKE 'procrastinate%' ORDER BY 1, 2"),
        "indexes": await sql(url, "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                                  "AND tablename LIKE 'procrastinate%' ORDER BY 1, 2"),
        "triggers": await sql(url, "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal "
                                   "AND tgname LIKE 'procrastinate%' ORDER BY 1"),
    }


async def a_job_goes_through_the_queue(url: str) -> None:
    """Defer, fetch (3.1's heartbeat worker ids), fail and retry (3.4's retry procedure)."""
    queue = JobQueue(url)
    await queue.open()
    try:
        await queue.enqueue(7, priority=0)
        manager = queue.app.job_manager
        worker = await manager.register_worker()
        job = await manager.fetch_job(queues=[QUEUE], worker_id=worker)
        assert job is not None and job.task_kwargs == {"job_id": 7}
        await manager.retry_job(job)
        again = await manager.fetch_job(queues=[QUEUE], worker_id=worker)
        assert again is not None and again.id == job.id and again.attempts == 1
    finally:
        await queue.close()


def test_db_upgrade_installs_the_queue_once(empty_postgres, tmp_path):
    first = db_upgrade(empty_postgres, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "installed the job queue's tables" in first.stderr
    recorded = asyncio.run(sql(empty_postgres, f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY name"))
    assert [name for (name,) in recorded] == [m.name for m in migrations()]  # the schema contains them all

    again = db_upgrade(empty_postgres, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "job queue" not in again.stderr  # nothing to do
    asyncio.run(a_job_goes_through_the_queue(empty_postgres))


def test_db_upgrade_migrates_an_older_procrastinate_schema_to_a_fresh_installs(empty_postgres, tmp_path):
    assert len(AFTER_3_0_2) >= 5  # 3.1 to 3.4 brought heartbeats, batch defer, a retry procedure
    from tests.support.postgres import reset_database

    assert asyncio.run(upgrade_queue_schema(empty_postgres)) == [INSTALLED]
    fresh = asyncio.run(queue_catalogue(empty_postgres))

    # A database installed with procrastinate 3.0.2: its schema, its migrations recorded.
    reset_database(empty_postgres)
    asyncio.run(sql(empty_postgres, SCHEMA_3_0_2.read_text()))
    assert asyncio.run(queue_catalogue(empty_postgres)) != fresh
    old = [m.name for m in migrations() if m.version <= (3, 0, 2)]
    asyncio.run(sql(empty_postgres, f"CREATE TABLE {MIGRATIONS_TABLE} (name text PRIMARY KEY, procrastinate text "
                                    "NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()); "
                                    f"INSERT INTO {MIGRATIONS_TABLE} (name, procrastinate) VALUES "
                                    + ", ".join(f"('{name}', '3.0.2')" for name in old)))

    result = db_upgrade(empty_postgres, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"upgraded the job queue's tables: {', '.join(AFTER_3_0_2)}" in result.stderr
    assert asyncio.run(queue_catalogue(empty_postgres)) == fresh
    again = db_upgrade(empty_postgres, tmp_path)
    assert again.returncode == 0 and "job queue" not in again.stderr, again.stderr
    asyncio.run(a_job_goes_through_the_queue(empty_postgres))


def test_tables_installed_before_migrations_were_recorded_count_as_that_version(empty_postgres):
    asyncio.run(sql(empty_postgres, SCHEMA_3_0_2.read_text()))  # no record: stembot installed it before
    applied = asyncio.run(upgrade_queue_schema(empty_postgres, unrecorded_version=(3, 0, 2)))
    assert applied == AFTER_3_0_2
    assert asyncio.run(upgrade_queue_schema(empty_postgres, unrecorded_version=(3, 0, 2))) == []
    asyncio.run(a_job_goes_through_the_queue(empty_postgres))
