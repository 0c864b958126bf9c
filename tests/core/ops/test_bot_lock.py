"""core.ops.bot_lock: one bot per database, on real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from core.ops.bot_lock import AnotherBotRunning, BotLock


@pytest.fixture
def postgres_url(postgres_server):
    return postgres_server


async def test_a_second_lock_on_one_sqlite_database_is_refused_naming_the_first(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'stembot.sqlite3'}"
    async with BotLock(url):
        with pytest.raises(AnotherBotRunning) as refused:
            await BotLock(url).acquire()
        assert f"pid {os.getpid()}" in refused.value.reason
        assert "already running" in refused.value.reason
        # Another database is another bot's business.
        async with BotLock(f"sqlite+aiosqlite:///{tmp_path / 'other.sqlite3'}"):
            pass
    async with BotLock(url):  # released: the next bot starts
        pass


def test_a_killed_bot_leaves_no_lock_behind(tmp_path):
    """The kernel drops the flock of a process killed with SIGKILL: no stale lock file to
    clean up by hand."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'stembot.sqlite3'}"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import asyncio, sys
        from core.ops.bot_lock import BotLock
        async def main():
            lock = BotLock({url!r})
            await lock.acquire()
            print("locked", flush=True)
            await asyncio.sleep(60)
            await lock.release()
        asyncio.run(main())
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(AnotherBotRunning) as refused:
            asyncio.run(BotLock(url).acquire())
        assert f"pid {holder.pid}" in refused.value.reason
    finally:
        holder.kill()
        holder.wait()
    asyncio.run(BotLock(url).release())  # nothing held: a no-op

    async def take_and_release() -> None:
        async with BotLock(url):
            pass

    asyncio.run(take_and_release())


async def test_a_second_lock_on_one_postgresql_database_is_refused_naming_the_first(postgres_url):
    async with BotLock(postgres_url):
        with pytest.raises(AnotherBotRunning) as refused:
            await BotLock(postgres_url).acquire()
        assert f"pid {os.getpid()}" in refused.value.reason
        assert "127.0.0.1" in refused.value.reason
    async with BotLock(postgres_url):
        pass


async def test_a_lost_lock_connection_takes_the_lock_again(postgres_url):
    """The lock's connection is killed on the server (as a database restart would): the
    watch takes the lock again, so a second bot is still refused."""
    lock = BotLock(postgres_url, watch_interval_s=0.2)
    await lock.acquire()
    admin = create_async_engine(postgres_url)
    try:
        await _terminate_lock_holder(admin)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if await _lock_holders(admin) == 1:
                break
        assert await _lock_holders(admin) == 1
        with pytest.raises(AnotherBotRunning):
            await BotLock(postgres_url).acquire()
    finally:
        await lock.release()
        await admin.dispose()


async def test_a_bot_whose_lock_another_took_meanwhile_is_told_to_stop(postgres_url):
    lost: list[str] = []
    lock = BotLock(postgres_url, on_lost=lost.append, watch_interval_s=0.5)
    await lock.acquire()
    admin = create_async_engine(postgres_url)
    other = BotLock(postgres_url)
    try:
        await _terminate_lock_holder(admin)
        for _ in range(20):  # the other bot gets in before the watch notices
            try:
                await other.acquire()
                break
            except AnotherBotRunning:
                await asyncio.sleep(0.02)
        for _ in range(50):
            if lost:
                break
            await asyncio.sleep(0.1)
        assert lost and "already running" in lost[0]
    finally:
        await other.release()
        await lock.release()
        await admin.dispose()


async def _terminate_lock_holder(admin) -> None:
    async with admin.begin() as connection:
        await connection.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"))


async def _lock_holders(admin) -> int:
    async with admin.connect() as connection:
        return (await connection.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"))).scalar_one()
