"""One bot per database: `stembot run` holds a lock for as long as it runs.

Two bots on one database would both dispatch and deliver: the second one's start-up
requeues the first one's running jobs, and users get their stems twice. So the bot takes
a lock before it connects to Discord, and a second one exits at once, naming the first.

- PostgreSQL: a session advisory lock, held by one connection of its own whose
  `application_name` says who holds it (`pg_stat_activity` shows it to the second bot).
  The server drops the lock when that connection ends, whatever killed the process. If
  the connection is lost while the bot runs (a database restart), the watch takes the
  lock again; when another bot took it meanwhile, this one stops.
- SQLite: an exclusive `flock` on `<database>.lock` beside the database file, which
  names the holder. The kernel drops it when the process ends.

Workers (`stembot worker`) take no lock: any number of them share a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.db import sqlite_file
from core.errors import StembotError

log = logging.getLogger(__name__)

# pg_try_advisory_lock(int, int): the first number is stembot's ("STEM" in ASCII), the
# second names the lock, so other software's advisory locks do not collide with it.
LOCK_SPACE = 0x5354454D
BOT_LOCK = 1
WATCH_INTERVAL_S = 15.0


class AnotherBotRunning(StembotError):
    kind = "another_bot"


def holder_name() -> str:
    """Who this process is, as the second bot will read it."""
    return f"stembot run on {socket.gethostname()} pid {os.getpid()}"[:63]


def _refusal(holder: str | None) -> AnotherBotRunning:
    who = f" ({holder})" if holder else ""
    return AnotherBotRunning(
        f"another stembot bot is already running on this database{who}. Stop it first, or give this "
        "one a database of its own (STEMBOT_DATA_DIR or STEMBOT_DATABASE_URL).")


class BotLock:
    """Held from `acquire` to `release`; `acquire` raises AnotherBotRunning when taken."""

    def __init__(self, database_url: str, on_lost: Callable[[str], Any] | None = None,
                 watch_interval_s: float = WATCH_INTERVAL_S) -> None:
        self.database_url = database_url
        self.on_lost = on_lost
        self.watch_interval_s = watch_interval_s
        self._file: IO[str] | None = None
        self._engine: AsyncEngine | None = None
        self._connection: AsyncConnection | None = None
        self._watch: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        if self.database_url.startswith("postgresql"):
            self._engine = create_async_engine(
                self.database_url, pool_size=1, max_overflow=0,
                connect_args={"server_settings": {"application_name": holder_name()}})
            try:
                await self._take_advisory()
            except BaseException:
                await self._engine.dispose()
                self._engine = None
                raise
            self._watch = asyncio.create_task(self._watch_advisory(), name="bot-lock-watch")
        else:
            path = sqlite_file(self.database_url)
            if path is not None:
                self._file = _lock_file(Path(f"{path}.lock"))

    async def release(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._connection is not None:
            with contextlib.suppress(Exception):  # the server drops the lock with the connection anyway
                await self._connection.close()
            self._connection = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    async def __aenter__(self) -> BotLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    # -- PostgreSQL ---------------------------------------------------------------------

    async def _take_advisory(self) -> None:
        assert self._engine is not None
        connection = await self._engine.connect()
        try:
            taken = (await connection.execute(
                text("SELECT pg_try_advisory_lock(:space, :lock)"), {"space": LOCK_SPACE, "lock": BOT_LOCK}
            )).scalar_one()
            await connection.commit()  # the lock belongs to the session, not the transaction
            if not taken:
                raise _refusal(await _advisory_holder(connection))
        except BaseException:
            await connection.close()
            raise
        self._connection = connection

    async def _watch_advisory(self) -> None:
        """Check the lock's connection now and then; take the lock again after it was lost."""
        while True:
            await asyncio.sleep(self.watch_interval_s)
            try:
                if self._connection is not None:
                    await self._connection.execute(text("SELECT 1"))
                    await self._connection.commit()
                    continue
            except Exception as exc:  # noqa: BLE001 - any failure means the lock may be gone
                log.warning("lost the database connection that holds the bot lock (%s); taking it again",
                            type(exc).__name__)
                connection, self._connection = self._connection, None
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.invalidate()
            try:
                await self._take_advisory()
                log.info("took the bot lock again")
            except AnotherBotRunning as exc:
                log.error("%s", exc.reason)
                if self.on_lost is not None:
                    self.on_lost(exc.reason)
                return
            except Exception as exc:  # noqa: BLE001 - the database is still away: try again later
                log.warning("cannot take the bot lock again yet (%s)", type(exc).__name__)


async def _advisory_holder(connection: AsyncConnection) -> str | None:
    """The application name and address of the session that holds the bot lock."""
    row = (await connection.execute(text(
        "SELECT a.application_name, host(a.client_addr), a.backend_start FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = :space AND l.objid = :lock AND l.objsubid = 2 "
        "AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
        {"space": LOCK_SPACE, "lock": BOT_LOCK})).first()
    await connection.commit()
    if row is None:
        return None
    name, address, since = row
    where = f" from {address}" if address else ""
    started = f", connected since {since:%Y-%m-%d %H:%M:%S %Z}" if since else ""
    return f"{name or 'an unnamed client'}{where}{started}"


# -- SQLite -----------------------------------------------------------------------------


def _lock_file(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a+", encoding="utf-8")  # held open for the bot's whole life
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read(200).strip() or None
        file.close()
        raise _refusal(holder) from None
    except BaseException:
        file.close()
        raise
    file.seek(0)
    file.truncate()
    file.write(f"{holder_name()}, since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC\n")
    file.flush()
    return file
