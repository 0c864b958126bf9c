"""Helpers for the quota, fair-order and sweeper tests: a migrated database (SQLite or
PostgreSQL) with several engines, job stores with a QuotaBook, raw views of the
counters, and a session factory that makes N callers hold a connection at once."""

from __future__ import annotations

import asyncio
import itertools
from contextlib import asynccontextmanager
from datetime import date

from sqlalchemy import select, text

from core.db import make_engine, make_sessions
from core.jobs.job import Job
from core.jobs.quotas import Ceilings, Policy, QuotaBook, QuotaSlot, QuotaUsage
from core.jobs.store import JobStore

FIELDS = dict(source_kind="attachment", source_url="https://cdn.example/a.mp3", source_name="a.mp3",
              model="tiny", stems="all", format="mp3")

# Roomy limits: tests narrow the one they are about.
ROOMY = Policy(user_minutes_per_day=600.0, guild_minutes_per_day=6000.0, user_concurrent_jobs=100,
               guild_queued_jobs=1000, max_track_minutes=60.0)


class Gate:
    """A session factory: each session checks out its own connection, then waits until
    `parties` sessions hold one before it is handed over, so that the callers' SQL really
    runs at the same time (not one after the other on a small pool).

    SQLite lets one write transaction in at a time (stembot begins them IMMEDIATE), so
    there the sessions meet at the barrier before they open theirs: the requests still
    arrive at the same instant, and the database makes them queue, as in production."""

    def __init__(self, session_makers, parties: int, timeout_s: float = 30.0, hold_connection: bool = True):
        self._makers = itertools.cycle(session_makers)
        self.barrier = asyncio.Barrier(parties)
        self.timeout_s = timeout_s
        self.hold_connection = hold_connection
        self.peak = 0
        self._holding = 0

    @asynccontextmanager
    async def __call__(self):
        async with next(self._makers)() as session:
            if self.hold_connection:
                await session.connection()
            self._holding += 1
            self.peak = max(self.peak, self._holding)
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.barrier.wait()
                yield session
            finally:
                self._holding -= 1


class Db:
    """A migrated database opened through `engines` engines (each pools up to 15
    connections, so 4 of them allow 60 truly concurrent sessions)."""

    def __init__(self, url: str, engines: int = 1):
        self.url = url
        self.engines = [make_engine(url) for _ in range(engines)]
        self.makers = [make_sessions(engine) for engine in self.engines]
        self.sessions = self.makers[0]

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith("postgresql")

    async def close(self) -> None:
        for engine in self.engines:
            await engine.dispose()

    def store(self, policy: Policy = ROOMY, sessions=None, ceilings: Ceilings | None = None) -> JobStore:
        sessions = sessions or self.sessions
        return JobStore(sessions, QuotaBook(sessions, policy, ceilings))

    def gate(self, parties: int) -> Gate:
        return Gate(self.makers, parties, hold_connection=self.is_postgres)

    async def sql(self, statement: str, **params) -> None:
        async with self.sessions() as session:
            await session.execute(text(statement), params)
            await session.commit()

    async def slots(self) -> dict[tuple[int, int], int]:
        async with self.sessions() as session:
            return {(r.guild_id, r.user_id): r.active for r in await session.scalars(select(QuotaSlot))}

    async def usage(self) -> dict[tuple[int, int, date], tuple[float, float]]:
        async with self.sessions() as session:
            return {(r.guild_id, r.user_id, r.day): (r.used_s, r.reserved_s)
                    for r in await session.scalars(select(QuotaUsage))}

    async def jobs(self) -> list[Job]:
        async with self.sessions() as session:
            return list(await session.scalars(select(Job).order_by(Job.id)))


@asynccontextmanager
async def open_db(url: str, engines: int = 1):
    db = Db(url, engines)
    try:
        yield db
    finally:
        await db.close()


async def admit(store: JobStore, policy: Policy = ROOMY, user_id: int = 1, guild_id: int | None = 5,
                **fields) -> Job:
    """Admit a job that must get a slot."""
    job, refusal = await store.admit(policy, **{**FIELDS, "user_id": user_id, "guild_id": guild_id, **fields})
    assert refusal is None and job is not None, refusal
    return job
