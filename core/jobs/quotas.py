"""Per-server policies, role tiers, and quotas that cannot be overrun.

Rules (documented for server owners in the README):
- Minutes are counted per calendar day in UTC; a day's allowance resets at 00:00 UTC.
- A job holds a *slot* from the moment it is queued until it ends: the per-user
  "concurrent jobs" and the per-server "queued jobs" limits count slots.
- Its audio minutes are *reserved* once its length is known (after download and probe),
  turned into *usage* when the stems are delivered, and released when it fails, is
  cancelled, or is refused. A retried job keeps its one reservation.
- Every slot and reservation is taken with one guarded UPDATE (`... WHERE used +
  reserved + n <= limit`), so concurrent requests can never exceed a limit, on SQLite
  and on PostgreSQL alike. Each job's quota state moves once (guarded too), so nothing
  is charged or released twice.
- Results served from the cache cost no minutes (no separation runs).
- Minutes follow cost: a job reserves and is charged its track's minutes times its cost
  factor (`jobs.cost_factor`: its model's, `core.separation.published`, or the sum of a
  chain's), which the bot sets at admission and nothing changes afterwards, so a restart
  charges exactly what was reserved.
- The operator's ceilings (`Ceilings`, STEMBOT_CEILING_*) cap every server setting and
  role tier: the limit in force is the smaller of the two. With ceilings, a member's
  minutes and jobs at once also count on counters across every server and DM (guild id
  EVERY_SERVER), held to the allowance of the server they ask in, so being in N servers
  does not give N allowances; and one counter holds the whole queue to its ceiling.
  Whether a job took those counters is on its row (`limits["across_servers"]`), so it
  gives back exactly what it took.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import BigInteger, Boolean, Date, Float, Integer, String, Text, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, rowcount, utcnow
from core.errors import InputError


def format_factor(cost_factor: float) -> str:
    """A cost factor as people read it: `2.5x`, `1x`."""
    return f"{cost_factor:g}x"


SERVER = 0  # the user id of a server's own usage row and slot counter
DM = 0  # the guild id of jobs outside any server
# The guild id of the counters over every server and DM: a member's minutes and jobs at
# once (user_id: the member), and the whole queue (user_id SERVER). Real ids are positive.
EVERY_SERVER = -1
ACROSS_SERVERS = "across_servers"  # the key in a job's limits: it took the EVERY_SERVER counters


class QuotaExceeded(InputError):
    kind = "quota_exceeded"


class GuildPolicy(Base):
    """A server's settings; NULL means "the bot's default"."""

    __tablename__ = "guild_policies"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_minutes_per_day: Mapped[float | None] = mapped_column(Float)
    guild_minutes_per_day: Mapped[float | None] = mapped_column(Float)
    user_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    guild_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_track_minutes: Mapped[float | None] = mapped_column(Float)
    allowed_models: Mapped[str | None] = mapped_column(Text)  # comma-separated; NULL = all
    allowed_formats: Mapped[str | None] = mapped_column(Text)
    links_allowed: Mapped[bool | None] = mapped_column(Boolean)
    streaming_links_allowed: Mapped[bool | None] = mapped_column(Boolean)  # YouTube, SoundCloud
    allowed_channels: Mapped[str | None] = mapped_column(Text)  # comma-separated ids; NULL = all
    default_model: Mapped[str | None] = mapped_column(String(64))
    default_format: Mapped[str | None] = mapped_column(String(16))
    # Who may start remix challenges besides members with Manage Server; NULL = nobody else.
    challenge_role_id: Mapped[int | None] = mapped_column(BigInteger)


class RoleTier(Base):
    """A larger allowance for members with a role (the largest of a member's tiers wins)."""

    __tablename__ = "role_tiers"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    role_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_minutes_per_day: Mapped[float | None] = mapped_column(Float)
    user_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    max_track_minutes: Mapped[float | None] = mapped_column(Float)


class QuotaUsage(Base):
    """Seconds of audio used and reserved on one UTC day, by a user (or a whole server,
    user_id 0) in one server."""

    __tablename__ = "quota_usage"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    used_s: Mapped[float] = mapped_column(Float, default=0.0)
    reserved_s: Mapped[float] = mapped_column(Float, default=0.0)


class QuotaSlot(Base):
    """Jobs a user (or a whole server, user_id 0) has queued or running."""

    __tablename__ = "quota_slots"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    active: Mapped[int] = mapped_column(Integer, default=0)


@dataclass(frozen=True)
class Policy:
    """The limits in force for one member of one server."""

    user_minutes_per_day: float
    guild_minutes_per_day: float
    user_concurrent_jobs: int
    guild_queued_jobs: int
    max_track_minutes: float
    allowed_models: tuple[str, ...] | None = None
    allowed_formats: tuple[str, ...] | None = None
    links_allowed: bool = True
    streaming_links_allowed: bool = False
    allowed_channels: tuple[int, ...] | None = None
    default_model: str | None = None
    default_format: str | None = None
    challenge_role_id: int | None = None

    def as_limits(self) -> dict[str, float]:
        """What a job keeps of its policy (the limits at the time it was asked for)."""
        return {"user_s": self.user_minutes_per_day * 60, "guild_s": self.guild_minutes_per_day * 60,
                "max_track_s": self.max_track_minutes * 60}


POLICY_FIELDS = ("user_minutes_per_day", "guild_minutes_per_day", "user_concurrent_jobs", "guild_queued_jobs",
                 "max_track_minutes")


@dataclass(frozen=True)
class Ceilings:
    """The operator's limits: no server setting or role tier goes above them."""

    user_minutes_per_day: float  # also held across every server by the member's counter
    guild_minutes_per_day: float
    user_concurrent_jobs: int  # likewise
    guild_queued_jobs: int
    max_track_minutes: float
    total_queued_jobs: int  # every server and DM together
    links_allowed: bool = True
    streaming_links_allowed: bool = True

    def binds(self, name: str, value: float) -> bool:
        """Whether `value` of the limit `name` (one of POLICY_FIELDS) is above its ceiling."""
        ceiling: float = getattr(self, name)
        return value > ceiling

    def clamp(self, policy: Policy) -> Policy:
        """`policy` with every limit at most its ceiling, and links off where the operator
        turned them off."""
        changes: dict[str, Any] = {name: getattr(self, name) for name in POLICY_FIELDS
                                   if self.binds(name, getattr(policy, name))}
        if not self.links_allowed:
            changes["links_allowed"] = False
        if not self.links_allowed or not self.streaming_links_allowed:
            changes["streaming_links_allowed"] = False
        return replace(policy, **changes) if changes else policy


def _split(text: str | None, kind: Callable[[str], object] = str) -> tuple[object, ...] | None:
    if text is None:
        return None
    return tuple(kind(part) for part in (p.strip() for p in text.split(",")) if part)


def effective_policy(defaults: Policy, guild: GuildPolicy | None, tiers: Iterable[RoleTier] = (),
                     ceilings: Ceilings | None = None) -> Policy:
    """Defaults, overridden by the server's settings, raised by the member's role tiers,
    then held to the operator's ceilings."""
    policy = defaults
    if guild is not None:
        changes = {name: getattr(guild, name) for name in POLICY_FIELDS if getattr(guild, name) is not None}
        for name in ("allowed_models", "allowed_formats"):
            if getattr(guild, name) is not None:
                changes[name] = _split(getattr(guild, name))
        if guild.allowed_channels is not None:
            changes["allowed_channels"] = _split(guild.allowed_channels, int) or None
        for name in ("links_allowed", "streaming_links_allowed", "default_model", "default_format",
                     "challenge_role_id"):
            if getattr(guild, name) is not None:
                changes[name] = getattr(guild, name)
        policy = replace(policy, **changes)
    for tier in tiers:
        changes = {}
        for name in ("user_minutes_per_day", "user_concurrent_jobs", "max_track_minutes"):
            value = getattr(tier, name)
            if value is not None and value > getattr(policy, name):
                changes[name] = value
        policy = replace(policy, **changes)
    return ceilings.clamp(policy) if ceilings is not None else policy


def utc_day(moment: datetime | None = None) -> date:
    return (moment or utcnow()).astimezone(UTC).date()


def next_reset(moment: datetime | None = None) -> datetime:
    day = utc_day(moment)
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC)


@dataclass
class QuotaStatus:
    """What /quota shows."""

    day: date
    user_used_s: float
    user_reserved_s: float
    guild_used_s: float
    guild_reserved_s: float
    user_active: int
    guild_active: int
    resets_at: datetime
    policy: Policy = field(repr=False)

    @property
    def user_left_s(self) -> float:
        return max(0.0, self.policy.user_minutes_per_day * 60 - self.user_used_s - self.user_reserved_s)

    @property
    def guild_left_s(self) -> float:
        return max(0.0, self.policy.guild_minutes_per_day * 60 - self.guild_used_s - self.guild_reserved_s)


class QuotaBook:
    """Policies, slots and minutes in SQL; with `ceilings`, held to the operator's ceilings
    and counted across servers too."""

    def __init__(self, sessions: async_sessionmaker, defaults: Policy, ceilings: Ceilings | None = None):
        self.sessions = sessions
        self.ceilings = ceilings
        self.defaults = ceilings.clamp(defaults) if ceilings is not None else defaults

    def job_limits(self, policy: Policy) -> dict[str, Any]:
        """What a job keeps of its policy, and whether it counts across servers."""
        limits: dict[str, Any] = dict(policy.as_limits())
        if self.ceilings is not None:
            limits[ACROSS_SERVERS] = True
        return limits

    # -- policies ----------------------------------------------------------------------

    async def policy(self, guild_id: int | None, role_ids: Iterable[int] = ()) -> Policy:
        if not guild_id:
            return self.defaults
        role_ids = list(role_ids)
        async with self.sessions() as session:
            guild = await session.get(GuildPolicy, guild_id)
            tiers = []
            if role_ids:
                tiers = list(await session.scalars(
                    select(RoleTier).where(RoleTier.guild_id == guild_id, RoleTier.role_id.in_(role_ids))))
        return effective_policy(self.defaults, guild, tiers, self.ceilings)

    async def guild_settings(self, guild_id: int) -> GuildPolicy:
        async with self.sessions() as session:
            return await session.get(GuildPolicy, guild_id) or GuildPolicy(guild_id=guild_id)

    async def set_guild(self, guild_id: int, **fields: Any) -> None:
        async with self.sessions() as session:
            row = await session.get(GuildPolicy, guild_id)
            if row is None:
                row = GuildPolicy(guild_id=guild_id)
                session.add(row)
            for name, value in fields.items():
                if not hasattr(GuildPolicy, name) or name == "guild_id":
                    raise ValueError(f"unknown setting {name}")
                setattr(row, name, value)
            await session.commit()

    async def tiers(self, guild_id: int) -> list[RoleTier]:
        async with self.sessions() as session:
            return list(await session.scalars(select(RoleTier).where(RoleTier.guild_id == guild_id)))

    async def set_tier(self, guild_id: int, role_id: int, **fields: Any) -> None:
        async with self.sessions() as session:
            row = await session.get(RoleTier, (guild_id, role_id))
            if row is None:
                row = RoleTier(guild_id=guild_id, role_id=role_id)
                session.add(row)
            for name, value in fields.items():
                setattr(row, name, value)
            await session.commit()

    async def remove_tier(self, guild_id: int, role_id: int) -> bool:
        async with self.sessions() as session:
            row = await session.get(RoleTier, (guild_id, role_id))
            if row is None:
                return False
            await session.delete(row)
            await session.commit()
            return True

    # -- slots ---------------------------------------------------------------------------

    @staticmethod
    async def _ensure(session: AsyncSession, model: type[Base], **key: int | date) -> None:
        """Create a counter row if missing (concurrent creators: one wins, others go on)."""
        if await session.get(model, tuple(key.values())) is not None:
            return
        try:
            async with session.begin_nested():
                session.add(model(**key))
        except IntegrityError:
            pass

    async def take_slots(self, session: AsyncSession, guild_id: int, user_id: int, policy: Policy) -> str | None:
        """Inside the caller's transaction: count one more active job for the user and the
        server (and, with ceilings, for the user across servers and the whole queue), or
        return why not (then the caller must roll back)."""
        mine = f"you already have {policy.user_concurrent_jobs} job(s) in progress; wait for one to finish"
        counters: list[tuple[int, int, int, str]] = []
        if self.ceilings is not None:
            # Locked in the order of the rows (guild id, then user id descending) everywhere:
            # PostgreSQL would otherwise find deadlocks between admissions and endings.
            total = self.ceilings.total_queued_jobs
            counters += [(EVERY_SERVER, user_id, policy.user_concurrent_jobs, mine),
                         (EVERY_SERVER, SERVER, total,
                          f"stembot's queue is full ({total} jobs across every server); try again in a few minutes")]
        counters += [(guild_id, user_id, policy.user_concurrent_jobs, mine),
                     (guild_id, SERVER, policy.guild_queued_jobs,
                      f"this server's queue is full ({policy.guild_queued_jobs} jobs); try again in a few minutes")]
        for guild, who, limit, refusal in counters:
            await self._ensure(session, QuotaSlot, guild_id=guild, user_id=who)
            result = await session.execute(
                update(QuotaSlot).where(QuotaSlot.guild_id == guild, QuotaSlot.user_id == who,
                                        QuotaSlot.active < limit).values(active=QuotaSlot.active + 1))
            if rowcount(result) != 1:
                return refusal
        return None

    async def release_slots(self, session: AsyncSession, guild_id: int, user_id: int,
                            across_servers: bool = False) -> None:
        keys = [(EVERY_SERVER, user_id), (EVERY_SERVER, SERVER)] if across_servers else []
        for guild, who in [*keys, (guild_id, user_id), (guild_id, SERVER)]:
            await session.execute(
                update(QuotaSlot).where(QuotaSlot.guild_id == guild, QuotaSlot.user_id == who,
                                        QuotaSlot.active > 0).values(active=QuotaSlot.active - 1))

    async def hold_slots(self, session: AsyncSession, guild_id: int, user_id: int, across_servers: bool = False
                         ) -> None:
        """Inside the caller's transaction: count one more active job on the counters
        `release_slots` frees, whatever the limits (an operator's retry of a failed job)."""
        keys = [(EVERY_SERVER, user_id), (EVERY_SERVER, SERVER)] if across_servers else []
        for guild, who in [*keys, (guild_id, user_id), (guild_id, SERVER)]:
            await self._ensure(session, QuotaSlot, guild_id=guild, user_id=who)
            await session.execute(update(QuotaSlot).where(QuotaSlot.guild_id == guild, QuotaSlot.user_id == who)
                                  .values(active=QuotaSlot.active + 1))

    # -- minutes -------------------------------------------------------------------------

    async def reserve(self, session: AsyncSession, guild_id: int, user_id: int, seconds: float, limits: dict,
                      day: date, cost_factor: float = 1.0) -> str | None:
        """Inside the caller's transaction: reserve a track of `seconds` times its
        `cost_factor` on the user's and the server's day (and the user's day across
        servers, if the job counts there), or return why not (then the caller must roll
        back)."""
        track_s, seconds = seconds, seconds * cost_factor
        counters: list[tuple[int, int, float, str, str]] = []
        if limits.get(ACROSS_SERVERS):
            counters.append((EVERY_SERVER, user_id, limits["user_s"], "your", "counted across every server and DM; "))
        counters += [(guild_id, user_id, limits["user_s"], "your", ""),
                     (guild_id, SERVER, limits["guild_s"], "this server's", "")]
        for guild, who, limit, whose, scope in counters:
            await self._ensure(session, QuotaUsage, guild_id=guild, user_id=who, day=day)
            result = await session.execute(
                update(QuotaUsage).where(
                    QuotaUsage.guild_id == guild, QuotaUsage.user_id == who, QuotaUsage.day == day,
                    QuotaUsage.used_s + QuotaUsage.reserved_s + seconds <= limit,
                ).values(reserved_s=QuotaUsage.reserved_s + seconds))
            if rowcount(result) != 1:
                row = await session.get(QuotaUsage, (guild, who, day), populate_existing=True)
                left = max(0.0, limit - row.used_s - row.reserved_s) if row else limit
                cost = (f"this track is {track_s / 60:.1f} min" if cost_factor == 1.0 else
                        f"this track costs {seconds / 60:.1f} min ({track_s / 60:.1f} min at "
                        f"{format_factor(cost_factor)} for its model)")
                return f"{cost} but {whose} daily allowance has {left / 60:.1f} min left ({scope}resets at 00:00 UTC)"
        return None

    async def settle(self, session: AsyncSession, guild_id: int, user_id: int, seconds: float, day: date,
                     charge: bool, across_servers: bool = False) -> None:
        """Inside the caller's transaction: turn a reservation into usage, or drop it."""
        keys = [(EVERY_SERVER, user_id)] if across_servers else []
        for guild, who in [*keys, (guild_id, user_id), (guild_id, SERVER)]:
            values = {"reserved_s": QuotaUsage.reserved_s - seconds}
            if charge:
                values["used_s"] = QuotaUsage.used_s + seconds
            await session.execute(
                update(QuotaUsage).where(QuotaUsage.guild_id == guild, QuotaUsage.user_id == who,
                                         QuotaUsage.day == day).values(**values))

    async def status(self, guild_id: int | None, user_id: int, policy: Policy) -> QuotaStatus:
        guild_id = guild_id or DM
        # With ceilings a member's allowance counts every server: their counter is that one.
        whose = EVERY_SERVER if self.ceilings is not None else guild_id
        day = utc_day()
        async with self.sessions() as session:
            mine = await session.get(QuotaUsage, (whose, user_id, day))
            server = await session.get(QuotaUsage, (guild_id, SERVER, day))
            my_slots = await session.get(QuotaSlot, (whose, user_id))
            server_slots = await session.get(QuotaSlot, (guild_id, SERVER))
        return QuotaStatus(
            day=day, user_used_s=mine.used_s if mine else 0.0, user_reserved_s=mine.reserved_s if mine else 0.0,
            guild_used_s=server.used_s if server else 0.0, guild_reserved_s=server.reserved_s if server else 0.0,
            user_active=my_slots.active if my_slots else 0, guild_active=server_slots.active if server_slots else 0,
            resets_at=next_reset(), policy=policy,
        )
