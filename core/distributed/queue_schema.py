"""The job queue's own tables (procrastinate's): installed on a new database, migrated on
an older one, by `stembot db upgrade`.

procrastinate ships its whole schema (`sql/schema.sql`, its current version) and the SQL
migrations from each version to the next (`sql/migrations/<version>_<nn>_<name>.sql`), but
keeps no record of which ones a database has: that is left to the application. stembot
records them in `stembot_queue_migrations`, one row per migration file applied or already
contained in the schema it installed, and applies the others in order, each in its own
transaction with its row, so an upgrade stopped half-way goes on where it stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import procrastinate
import psycopg
from procrastinate.schema import SchemaManager

from core.distributed.queue import conninfo

MIGRATIONS_TABLE = "stembot_queue_migrations"
# What `upgrade_queue_schema` returns when it installed the whole schema.
INSTALLED = "schema"
# A database whose queue tables stembot installed before it recorded their migrations
# holds the schema of procrastinate 3.10 (pinned since distributed mode began).
UNRECORDED_VERSION = (3, 10, 0)
# Two `stembot db upgrade`s at once: one waits for the other (pg_advisory_lock's key).
_LOCK_KEY = 0x5354454D_51554555 >> 2  # "STEMQUEU", within bigint

_NAME = re.compile(r"(\d+)\.(\d+)\.(\d+)_\d+_\w+\.sql")


@dataclass(frozen=True)
class Migration:
    name: str  # the file's name, e.g. 03.04.00_01_pre_add_retry_failed_job_procedure.sql
    version: tuple[int, int, int]  # the procrastinate version it leads to
    path: Path


def migrations(folder: Path | None = None) -> list[Migration]:
    """procrastinate's migration files, in the order they apply (their zero-padded names)."""
    folder = folder or Path(SchemaManager.get_migrations_path())
    found = []
    for path in folder.glob("*.sql"):
        match = _NAME.fullmatch(path.name)
        if match is not None:
            major, minor, patch = (int(part) for part in match.groups())
            found.append(Migration(path.name, (major, minor, patch), path))
    return sorted(found, key=lambda migration: migration.name)


async def schema_installed(database_url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(conninfo(database_url)) as connection:
        return await _has_queue_tables(connection)


async def upgrade_queue_schema(database_url: str, unrecorded_version: tuple[int, int, int] = UNRECORDED_VERSION
                               ) -> list[str]:
    """Bring procrastinate's tables to the installed procrastinate's version: the whole
    schema on a database without them, else the migrations not recorded yet. A database
    with the tables and no record holds `unrecorded_version`'s schema. Returns what was
    done: [INSTALLED], the names of the migrations applied, or nothing."""
    async with await psycopg.AsyncConnection.connect(conninfo(database_url), autocommit=True) as connection:
        await connection.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            return await _upgrade(connection, unrecorded_version)
        finally:
            await connection.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


async def install_schema(database_url: str) -> bool:
    """Create procrastinate's tables on a database that has none (else migrate them).
    Returns whether it created them."""
    return await upgrade_queue_schema(database_url) == [INSTALLED]


async def _upgrade(connection: psycopg.AsyncConnection, unrecorded_version: tuple[int, int, int]) -> list[str]:
    await connection.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (name text PRIMARY KEY, "
                             "procrastinate text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
    known = migrations()
    cursor = await connection.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")
    recorded = {row[0] for row in await cursor.fetchall()}
    if not await _has_queue_tables(connection):
        async with connection.transaction():
            # No parameters: psycopg sends the script as it is (its '%' signs included).
            await connection.execute(SchemaManager.get_schema())
            await _record(connection, [m.name for m in known])
        return [INSTALLED]
    if not recorded:
        async with connection.transaction():
            await _record(connection, [m.name for m in known if m.version <= unrecorded_version])
        recorded = {m.name for m in known if m.version <= unrecorded_version}
    applied = []
    for migration in known:
        if migration.name in recorded:
            continue
        async with connection.transaction():
            await connection.execute(migration.path.read_text(encoding="utf-8"))
            await _record(connection, [migration.name])
        applied.append(migration.name)
    return applied


async def _record(connection: psycopg.AsyncConnection, names: list[str]) -> None:
    async with connection.cursor() as cursor:
        await cursor.executemany(
            f"INSERT INTO {MIGRATIONS_TABLE} (name, procrastinate) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            [(name, procrastinate.__version__) for name in names])


async def _has_queue_tables(connection: psycopg.AsyncConnection) -> bool:
    cursor = await connection.execute("SELECT to_regclass('procrastinate_jobs')")
    row = await cursor.fetchone()
    return row is not None and row[0] is not None
