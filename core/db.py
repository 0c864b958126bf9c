"""The SQL database: the declarative base, engines, sessions, and `upgrade` (Alembic)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import DateTime, MetaData, TypeDecorator, event, select, text
from sqlalchemy.engine import CursorResult, Result, make_url
from sqlalchemy.exc import CompileError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.sql.functions import FunctionElement

from core.errors import StembotError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry
    from sqlalchemy.sql.compiler import SQLCompiler

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Stable constraint names, so that migrations can name what they alter on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use datetime.now(timezone.utc)")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def as_utc(value: datetime) -> datetime:
    """A datetime read from the database, timezone-aware (SQLite drops the zone; stored values are UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def utcnow() -> datetime:
    return datetime.now(UTC)


class DatabaseClock(FunctionElement[datetime]):
    """The database's clock, read by the database as it runs the statement (UTC).

    Times that processes on several machines write and others compare (a run's heartbeat,
    a worker's liveness) are written and compared on this one clock, whatever each
    machine's own clock says. SQLite has no server: there it is the clock of the process
    that writes the file, the same clock as `utcnow()`."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(DatabaseClock)
def _clock(element: DatabaseClock, compiler: SQLCompiler, **kw: Any) -> str:
    if compiler.dialect.name != "sqlite":
        raise CompileError(f"no database clock for {compiler.dialect.name}")
    # The text SQLAlchemy stores a SQLite datetime as (microseconds; SQLite's %f has
    # milliseconds), so that values written either way compare and parse alike.
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


@compiles(DatabaseClock, "postgresql")
def _postgresql_clock(element: DatabaseClock, compiler: SQLCompiler, **kw: Any) -> str:
    return "statement_timestamp()"


def database_clock() -> DatabaseClock:
    """The database's clock as an SQL expression, for a value to write or compare with."""
    return DatabaseClock()


async def database_now(session: AsyncSession) -> datetime:
    """The database's clock, read now (UTC)."""
    now = await session.scalar(select(database_clock()))
    assert isinstance(now, datetime), now
    return as_utc(now)


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE run with `session.execute` matched (its result is a
    CursorResult, though typed as a plain Result)."""
    assert isinstance(result, CursorResult), type(result)
    return result.rowcount


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        _ensure_sqlite_folder(url)
        ensure_wal(url)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            # The driver's own deferred BEGIN is replaced below.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(connection: Connection) -> None:
            # A deferred transaction that reads, then writes, fails at once with "database
            # is locked" when another writer got in between (the busy timeout does not
            # apply to that upgrade). Taking the write lock up front makes concurrent
            # requests wait their turn instead; SQLite serialises writers anyway.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_async_engine(url, pool_pre_ping=True)


def make_sessions(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


def ensure_wal(url: str, timeout_s: float = 30.0) -> None:
    """Put a SQLite database file in WAL mode (readers never wait for the writer).

    The mode is stored in the file, so this runs once per engine, before its pool opens
    any connection. Switching asks for an exclusive lock while holding a read lock, and
    SQLite then fails at once with "database is locked" instead of waiting (its busy
    timeout does not apply); when each pooled connection switched for itself, the first
    ones to open on a freshly migrated database failed that way now and then. So: one
    switch here, retried while another process (the bot and a worker starting together)
    holds the file."""
    path = sqlite_file(url)
    if path is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with closing(sqlite3.connect(path, timeout=timeout_s)) as db:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        if mode != "wal":
            # A file system without shared memory, say: SQLite keeps its rollback journal,
            # which works, with readers and the writer taking turns.
            log.warning("SQLite kept journal mode %s for %s (WAL unavailable)", mode, path)
        return


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database or a `file:` URI."""
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def _ensure_sqlite_folder(url: str) -> None:
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    return config


class SchemaTooNew(StembotError):
    """The database's schema is at a revision this code does not know: a newer stembot
    migrated it (the operator rolled the code back), and this one would misread it."""

    kind = "schema_too_new"


def upgrade(url: str, revision: str = "head") -> None:
    """Apply Alembic migrations up to `revision` (creates the schema on a new database).
    Raises SchemaTooNew, touching nothing, when the database is at a revision this code
    does not know."""
    if url.startswith("sqlite"):
        _ensure_sqlite_folder(url)
    found = asyncio.run(_stored_revision(url))
    if found is not None and found not in known_revisions():
        raise SchemaTooNew(f"the database's schema is at revision {found}, which this stembot does not know "
                           f"(it knows revisions up to {head_revision()}): a newer stembot migrated it; "
                           "upgrade stembot to that version or later (rolling back stembot does not roll back "
                           "the database)")
    command.upgrade(alembic_config(url), revision)


async def _stored_revision(url: str) -> str | None:
    # A plain engine, as Alembic's: nothing about the file changed before the migration.
    engine = create_async_engine(url)
    try:
        return await schema_revision(engine)
    finally:
        await engine.dispose()


def head_revision() -> str | None:
    """The newest schema revision this code knows."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions()}


async def schema_revision(engine: AsyncEngine) -> str | None:
    """The revision a database's schema is at; None before the first migration."""
    async with engine.connect() as connection:
        try:
            return (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar_one_or_none()
        except DBAPIError:
            return None

