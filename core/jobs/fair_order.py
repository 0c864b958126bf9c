"""Fair order: which queued job runs next, so that no server or user floods the others."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class QueuedJob:
    id: int
    priority: int
    created_at: datetime
    guild: int
    user: int


def fair_order(queued: list[QueuedJob], last_guild: dict[int, float], last_user: dict[tuple[int, int], float]
               ) -> list[int]:
    """The order in which queued jobs will run.

    Lower priority numbers first (interactive before bulk). Within a priority, the server
    served longest ago goes next; within that server, the user served longest ago; and
    of that user's jobs, the oldest. Serving a job makes its server and user the most
    recently served, so one user or one server flooding the queue takes turns with
    everyone else instead of going first. `last_*` map to the time each was last served.
    """
    remaining = sorted(queued, key=lambda j: (j.created_at, j.id))
    last_guild, last_user = dict(last_guild), dict(last_user)
    never = float("-inf")
    tick = max([*last_guild.values(), *last_user.values(), 0.0]) + 1.0
    order: list[int] = []
    while remaining:
        top = min(j.priority for j in remaining)
        candidates = [j for j in remaining if j.priority == top]
        # Candidates are oldest first, so ties go to whoever has waited longest.
        guild = min(candidates, key=lambda j: last_guild.get(j.guild, never)).guild
        in_guild = [j for j in candidates if j.guild == guild]
        job = min(in_guild, key=lambda j: last_user.get((j.guild, j.user), never))
        order.append(job.id)
        remaining.remove(job)
        last_guild[job.guild] = last_user[(job.guild, job.user)] = tick
        tick += 1.0
    return order


