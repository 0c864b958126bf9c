"""Usage statistics of a server over a period, for `/stembot stats`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from core.jobs.job import Job, JobState


@dataclass
class ServerStats:
    since: datetime | None
    by_state: dict[str, int] = field(default_factory=dict)
    audio_minutes: float = 0.0
    separation_minutes: float = 0.0
    failures: list[tuple[str, int, str]] = field(default_factory=list)  # kind, count, an example reason
    busiest: list[tuple[int, int, float]] = field(default_factory=list)  # user id, jobs, audio minutes
    cache_hits: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


async def server_stats(sessions: async_sessionmaker, guild_id: int, since: datetime | None,
                       top: int = 5) -> ServerStats:
    conditions = [Job.guild_id == guild_id]
    if since is not None:
        conditions.append(Job.created_at >= since)
    stats = ServerStats(since)
    done = JobState.done.value
    async with sessions() as session:
        for state, count in await session.execute(select(Job.state, func.count()).where(*conditions)
                                                  .group_by(Job.state)):
            stats.by_state[state] = count
        minutes = (await session.execute(
            select(func.coalesce(func.sum(Job.duration_s), 0.0), func.coalesce(func.sum(Job.separation_s), 0.0),
                   func.count().filter(Job.cache_hit.is_(True)))
            .where(*conditions, Job.state == done))).one()
        stats.audio_minutes, stats.separation_minutes, stats.cache_hits = minutes[0] / 60, minutes[1] / 60, minutes[2]
        failures = await session.execute(
            select(Job.error_kind, func.count(), func.max(Job.error))
            .where(*conditions, Job.state == JobState.failed.value)
            .group_by(Job.error_kind).order_by(func.count().desc()))
        stats.failures = [(kind or "error", count, reason or "") for kind, count, reason in failures]
        busiest = await session.execute(
            select(Job.user_id, func.count(), func.coalesce(func.sum(Job.duration_s), 0.0))
            .where(*conditions, Job.state == done)
            .group_by(Job.user_id).order_by(func.sum(Job.duration_s).desc()).limit(top))
        stats.busiest = [(user, count, seconds / 60) for user, count, seconds in busiest]
    return stats
