"""core.db: SQLite engines put the database file in WAL mode once, before any pooled
connection opens, and wait for other connections while they switch."""

from __future__ import annotations

import sqlite3
import threading
import time

from sqlalchemy import text

from core.db import ensure_wal, make_engine, upgrade


def journal_mode(path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


def sqlite_file(tmp_path):
    path = tmp_path / "db" / "stembot.sqlite"
    return path, f"sqlite+aiosqlite:///{path}"


async def test_a_migrated_database_is_in_wal_mode_before_the_pool_opens_a_connection(tmp_path, sqlite_url):
    path, url = sqlite_file(tmp_path)
    assert url == sqlite_url  # migrated by the fixture (Alembic runs its own event loop)
    assert journal_mode(path) == "delete"  # as Alembic leaves it

    engine = make_engine(url)
    try:
        assert engine.sync_engine.pool.checkedout() == 0
        assert journal_mode(path) == "wal"
        async with engine.connect() as connection:
            assert (await connection.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await connection.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await connection.execute(text("PRAGMA busy_timeout"))).scalar() == 30000
    finally:
        await engine.dispose()


def test_the_switch_waits_for_a_reader_in_another_connection(tmp_path):
    # Switching takes an exclusive lock without SQLite's busy timeout: while another
    # connection reads, a plain "PRAGMA journal_mode=WAL" fails at once. ensure_wal waits.
    path, url = sqlite_file(tmp_path)
    upgrade(url)
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM jobs").fetchone()  # holds a shared lock
    release = threading.Timer(0.5, reader.execute, args=("COMMIT",))
    started = time.monotonic()
    release.start()
    try:
        ensure_wal(url)
        waited = time.monotonic() - started
    finally:
        release.join()
        reader.close()
    assert journal_mode(path) == "wal"
    assert waited >= 0.4


def test_memory_databases_are_left_alone():
    ensure_wal("sqlite+aiosqlite://")
    ensure_wal("sqlite+aiosqlite:///:memory:")
