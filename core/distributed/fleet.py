"""The separation workers of a distributed set-up: which are alive, where, doing what.

Each `stembot worker` writes one row per device (a "slot": one model host, one job at a
time) and refreshes it every few seconds. The bot reads them to know how many jobs it
may hand to the queue, and `/stembot workers` shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Integer, String, delete, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, UTCDateTime, as_utc, database_now, utcnow


class WorkerSlot(Base):
    __tablename__ = "worker_slots"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)  # "<worker>/<device>"
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # starting, ready, draining
    job_id: Mapped[int | None] = mapped_column(Integer)
    # Jobs the slot runs at once (a GPU host batches several jobs' segments).
    capacity: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


@dataclass(frozen=True)
class SlotView:
    name: str
    host: str
    device: str
    model: str
    state: str
    job_id: int | None
    seen_s_ago: float
    capacity: int = 1


class Fleet:
    def __init__(self, sessions: async_sessionmaker, stale_s: float = 30.0):
        self.sessions = sessions
        self.stale_s = stale_s

    async def beat(self, name: str, **fields: object) -> None:
        """Create or refresh a slot's row."""
        async with self.sessions() as session:
            now = await database_now(session)
            moved = await session.execute(update(WorkerSlot).where(WorkerSlot.name == name)
                                          .values(seen_at=now, **fields))
            if moved.rowcount == 0:
                session.add(WorkerSlot(name=name, started_at=now, seen_at=now, **fields))
            await session.commit()

    async def leave(self, name: str) -> None:
        async with self.sessions() as session:
            await session.execute(delete(WorkerSlot).where(WorkerSlot.name == name))
            await session.commit()

    async def slots(self, include_stale: bool = False) -> list[SlotView]:
        async with self.sessions() as session:
            now = await database_now(session)
            query = select(WorkerSlot).order_by(WorkerSlot.name)
            if not include_stale:
                query = query.where(WorkerSlot.seen_at > now - timedelta(seconds=self.stale_s))
            rows = list(await session.scalars(query))
        return [SlotView(r.name, r.host, r.device, r.model, r.state, r.job_id,
                         (now - as_utc(r.seen_at)).total_seconds(), r.capacity) for r in rows]

    async def ready_slots(self) -> int:
        """Jobs the live slots that take jobs (not starting, not draining) can run at once."""
        return sum(slot.capacity for slot in await self.slots() if slot.state == "ready")

    async def forget_stale(self, older_than_s: float = 3600.0) -> int:
        """Drop rows of workers gone for a long while (they stay visible for a time first)."""
        async with self.sessions() as session:
            now = await database_now(session)
            gone = await session.execute(delete(WorkerSlot).where(
                WorkerSlot.seen_at < now - timedelta(seconds=older_than_s)))
            await session.commit()
            return gone.rowcount

