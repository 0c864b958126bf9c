"""Remix challenges: a track is split, its stems are handed to everyone, members remix
it, the community votes. This module is the SQL side (no Discord): the rows, the rules,
and the deadlines.

A challenge moves through these states, each move one guarded UPDATE (`... WHERE
state IN (...)`), so two schedulers, or a scheduler and a `/challenge end`, can never
both act on the same deadline:

    splitting -> open -> voting -> closed
    splitting | open | voting -> cancelled

- **splitting**: the track is a bulk job (priority 10) queued through the dispatcher and
  charged to the host's quota like any job; its stems are posted in the challenge's
  thread. The challenge opens once the job is done, and is cancelled if it fails.
- **open**: members submit one entry each (`submit_entry`), replaceable until the
  submission deadline. The file lives in storage under `challenges/<id>/entries/`.
  Replacing an entry resets its `submitted_at` (the tie-break below) and counts in
  `replaced`. A submission is accepted only while the state is `open` *and* the
  deadline has not passed, checked in the same transaction that stores it: a late
  submission is refused even when the scheduler has not yet acted on the deadline.
- **voting**: `open_voting` moves the state and numbers the entries (`position`, 1..n)
  in one transaction: by submission time, or shuffled in anonymous mode so the order
  gives nothing away. Members vote (`vote`): one vote per member per challenge, a
  second vote changes the first (counted once), never for one's own entry, only while
  the state is `voting` and the voting deadline has not passed.
- **closed**: `tally` ranks the entries by votes, ties broken by the earliest
  (current) submission, then by entry id.

Deadlines are stored as absolute UTC times; `due(now)` lists every challenge with
something to do (a finished split job, a passed deadline, voting posts not yet made),
so a bot that was down acts on everything it missed as soon as it starts.

Posting to Discord is claimed before it is done: the state transition (or, per entry,
`claim_entry_post`) is the claim, so nothing is posted twice; a crash in the instant
between a claim and its post loses that one post (the rows stay right, and `/challenge
status` shows the ranking from SQL).
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute, Mapped, mapped_column
from sqlalchemy.sql.selectable import ScalarSelect

from core.db import Base, UTCDateTime, as_utc, rowcount, utcnow
from core.errors import StembotError
from core.jobs.job import FINAL, Job


class ChallengeState(str, enum.Enum):  # noqa: UP042 - StrEnum would change str()/f-strings of members (logs, messages)
    splitting = "splitting"
    open = "open"
    voting = "voting"
    closed = "closed"
    cancelled = "cancelled"


ACTIVE = (ChallengeState.splitting, ChallengeState.open, ChallengeState.voting)
ENDED = (ChallengeState.closed, ChallengeState.cancelled)

# Which states each state may be entered from.
ALLOWED_FROM: dict[ChallengeState, tuple[ChallengeState, ...]] = {
    ChallengeState.open: (ChallengeState.splitting,),
    ChallengeState.voting: (ChallengeState.open,),
    ChallengeState.closed: (ChallengeState.voting,),
    ChallengeState.cancelled: ACTIVE,
}

# A challenge whose split job never got queued (the bot died between the two) is given up.
ORPHAN_AFTER = timedelta(minutes=10)

MIN_WINDOW = timedelta(seconds=10)
MAX_WINDOW = timedelta(days=90)
POSTING = 0  # message id of a post that is claimed but not yet made


class ChallengeError(StembotError):
    """A submission or a vote refused by the rules; `reason` is fit to show the member."""

    kind = "challenge"


class Closed(ChallengeError):
    kind = "closed"


class OwnEntry(ChallengeError):
    kind = "own_entry"


class UnknownEntry(ChallengeError):
    kind = "unknown_entry"


class TooManySubmissions(ChallengeError):
    kind = "too_many_submissions"


class Challenge(Base):
    __tablename__ = "challenges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    guild_id: Mapped[int] = mapped_column(BigInteger, index=True)
    channel_id: Mapped[int] = mapped_column(BigInteger)  # where it was announced
    thread_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    announcement_message_id: Mapped[int | None] = mapped_column(BigInteger)
    host_id: Mapped[int] = mapped_column(BigInteger)

    title: Mapped[str] = mapped_column(String(100))
    rules: Mapped[str] = mapped_column(Text, default="")
    source_name: Mapped[str] = mapped_column(String(255), default="")
    stems: Mapped[str] = mapped_column(String(128), default="all")
    format: Mapped[str] = mapped_column(String(16), default="mp3")
    anonymous: Mapped[bool] = mapped_column(Boolean, default=False)
    submit_deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    vote_deadline: Mapped[datetime] = mapped_column(UTCDateTime)

    state: Mapped[str] = mapped_column(String(16), default=ChallengeState.splitting.value, index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)  # the bulk split of the track
    result_message_id: Mapped[int | None] = mapped_column(BigInteger)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_by: Mapped[int | None] = mapped_column(BigInteger)  # who ran /challenge end
    end_reason: Mapped[str | None] = mapped_column(Text)

    @property
    def challenge_state(self) -> ChallengeState:
        return ChallengeState(self.state)

    @property
    def next_deadline(self) -> datetime | None:
        if self.state == ChallengeState.open.value:
            return self.submit_deadline
        if self.state == ChallengeState.voting.value:
            return self.vote_deadline
        return None


class ChallengeEntry(Base):
    __tablename__ = "challenge_entries"
    __table_args__ = (UniqueConstraint("challenge_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    file_path: Mapped[str] = mapped_column(Text)  # relative to the storage root
    original_name: Mapped[str] = mapped_column(String(255))
    duration_s: Mapped[float | None] = mapped_column(Float)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    replaced: Mapped[int] = mapped_column(Integer, default=0)
    position: Mapped[int | None] = mapped_column(Integer)  # "Entry <n>", set when voting opens
    message_id: Mapped[int | None] = mapped_column(BigInteger)  # its voting post (0 while posting)


class ChallengeVote(Base):
    __tablename__ = "challenge_votes"
    __table_args__ = (UniqueConstraint("challenge_id", "voter_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id", ondelete="CASCADE"), index=True)
    voter_id: Mapped[int] = mapped_column(BigInteger)
    entry_id: Mapped[int] = mapped_column(ForeignKey("challenge_entries.id", ondelete="CASCADE"), index=True)
    voted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    changes: Mapped[int] = mapped_column(Integer, default=0)


def submissions(entry: ChallengeEntry | None) -> int:
    """How many times a member sent an entry to a challenge (the first and its replacements)."""
    return 0 if entry is None else 1 + entry.replaced


# -- durations -------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


def parse_duration(text: str) -> timedelta:
    """`"2d"`, `"36h"`, `"90m"`, `"1d12h"`, `"20s"` -> a timedelta. Raises ValueError
    with a message fit to show when it is not one, or is outside 10 s .. 90 days."""
    compact = (text or "").strip().lower().replace(" ", "")
    if not compact or _PART.sub("", compact):
        raise ValueError(f"can't read {text!r} as a duration; write it like 3d, 36h, 90m or 1d12h")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(compact))
    span = timedelta(seconds=seconds)
    if span < MIN_WINDOW:
        raise ValueError(f"{text.strip()} is too short; give at least {int(MIN_WINDOW.total_seconds())} s")
    if span > MAX_WINDOW:
        raise ValueError(f"{text.strip()} is too long; give at most {MAX_WINDOW.days} days")
    return span


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    entry: ChallengeEntry
    replaced: bool
    old_path: str | None  # the replaced entry's file, to delete when it differs


@dataclass(frozen=True)
class Voted:
    entry: ChallengeEntry
    previous_entry_id: int | None  # None: a first vote
    unchanged: bool = False  # the same entry again


@dataclass(frozen=True)
class Standing:
    rank: int
    entry: ChallengeEntry
    votes: int


class ChallengeStore:
    """Queries and guarded transitions on challenges, entries and votes. Every method commits."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    # -- challenges --------------------------------------------------------------------------

    async def create(self, **fields: Any) -> Challenge:
        async with self.sessions() as session:
            challenge = Challenge(**fields)
            session.add(challenge)
            await session.commit()
            return challenge

    async def get(self, challenge_id: int) -> Challenge | None:
        async with self.sessions() as session:
            return await session.get(Challenge, challenge_id)

    async def update(self, challenge_id: int, **fields: Any) -> None:
        """Set fields without changing the state (message ids, the job id)."""
        async with self.sessions() as session:
            await session.execute(update(Challenge).where(Challenge.id == challenge_id)
                                  .values(updated_at=utcnow(), **fields))
            await session.commit()

    async def transition(self, challenge_id: int, to: ChallengeState, **fields: Any) -> bool:
        """Move the challenge to `to` if its state allows it. Returns whether it moved;
        only the caller that moved it may act on the move (post, clean up)."""
        values = {"state": to.value, "updated_at": utcnow(), **fields}
        if to in ENDED:
            values.setdefault("ended_at", utcnow())
        allowed = [s.value for s in ALLOWED_FROM[to]]
        async with self.sessions() as session:
            moved = await session.execute(
                update(Challenge).where(Challenge.id == challenge_id, Challenge.state.in_(allowed)).values(**values))
            await session.commit()
            return rowcount(moved) == 1

    async def for_guild(self, guild_id: int, states: Iterable[ChallengeState | str] | None = None,
                        limit: int = 10) -> list[Challenge]:
        """The server's challenges, newest first."""
        async with self.sessions() as session:
            query = select(Challenge).where(Challenge.guild_id == guild_id)
            if states is not None:
                query = query.where(Challenge.state.in_([ChallengeState(s).value for s in states]))
            return list(await session.scalars(query.order_by(Challenge.id.desc()).limit(limit)))

    async def in_thread(self, thread_id: int) -> Challenge | None:
        async with self.sessions() as session:
            return await session.scalar(select(Challenge).where(Challenge.thread_id == thread_id)
                                        .order_by(Challenge.id.desc()).limit(1))

    # -- deadlines -----------------------------------------------------------------------------

    async def due(self, now: datetime | None = None) -> list[Challenge]:
        """Challenges with something to do now: a split job that ended, a deadline that
        passed, or voting posts not yet made (a restart in the middle of posting)."""
        now = now or utcnow()
        unposted = exists(select(ChallengeEntry.id).where(ChallengeEntry.challenge_id == Challenge.id,
                                                          ChallengeEntry.message_id.is_(None)))
        async with self.sessions() as session:
            rows = await session.scalars(
                select(Challenge).outerjoin(Job, Job.id == Challenge.job_id).where(or_(
                    and_(Challenge.state == ChallengeState.splitting.value,
                         or_(Job.state.in_([s.value for s in FINAL]),
                             and_(Challenge.job_id.is_(None), Challenge.created_at < now - ORPHAN_AFTER))),
                    and_(Challenge.state == ChallengeState.open.value, Challenge.submit_deadline <= now),
                    and_(Challenge.state == ChallengeState.voting.value,
                         or_(Challenge.vote_deadline <= now, unposted)),
                )).order_by(Challenge.id)
            )
            return list(rows)

    async def next_deadline(self) -> datetime | None:
        """The earliest deadline of an open or voting challenge (what a scheduler sleeps until)."""
        async with self.sessions() as session:
            submit = await session.scalar(select(func.min(Challenge.submit_deadline))
                                          .where(Challenge.state == ChallengeState.open.value))
            vote = await session.scalar(select(func.min(Challenge.vote_deadline))
                                        .where(Challenge.state == ChallengeState.voting.value))
        moments = [as_utc(m) for m in (submit, vote) if m is not None]
        return min(moments) if moments else None

    # -- entries -------------------------------------------------------------------------------

    @staticmethod
    async def _guard(session: AsyncSession, challenge_id: int | ScalarSelect[int], state: ChallengeState,
                     deadline: InstrumentedAttribute[datetime], now: datetime) -> bool:
        """Inside the caller's transaction: a write on the challenge's row that succeeds only
        in `state` before `deadline`. It also locks the row (PostgreSQL) or the database
        (SQLite) until commit, so a transition cannot slip in between check and write."""
        moved = await session.execute(
            update(Challenge).where(Challenge.id == challenge_id, Challenge.state == state.value, deadline > now)
            .values(updated_at=now))
        return rowcount(moved) == 1

    async def submit_entry(self, challenge_id: int, user_id: int, *, file_path: str, original_name: str,
                           duration_s: float | None = None, size_bytes: int | None = None,
                           now: datetime | None = None, max_submissions: int | None = None) -> Submitted:
        """Store a member's entry, or replace theirs. Raises Closed outside the window, and
        TooManySubmissions when the member already sent `max_submissions` (the first entry
        and its replacements)."""
        now = now or utcnow()
        async with self.sessions() as session:
            if not await self._guard(session, challenge_id, ChallengeState.open, Challenge.submit_deadline, now):
                await session.rollback()
                raise Closed("submissions are closed for this challenge")
            entry = await session.scalar(select(ChallengeEntry).where(
                ChallengeEntry.challenge_id == challenge_id, ChallengeEntry.user_id == user_id))
            fields = dict(file_path=file_path, original_name=original_name[:255], duration_s=duration_s,
                          size_bytes=size_bytes, submitted_at=now)
            if entry is None:
                entry = ChallengeEntry(challenge_id=challenge_id, user_id=user_id, **fields)
                session.add(entry)
                try:
                    await session.commit()
                except IntegrityError:  # cannot happen behind the guard; say so plainly if it does
                    await session.rollback()
                    raise ChallengeError("your entry arrived twice at once; please submit it again") from None
                return Submitted(entry, replaced=False, old_path=None)
            sent = submissions(entry)
            if max_submissions is not None and sent >= max_submissions:
                await session.rollback()
                raise TooManySubmissions(f"you have sent {sent} entries to this challenge, the most allowed; your "
                                         "current entry stays")
            old_path = entry.file_path
            for name, value in fields.items():
                setattr(entry, name, value)
            entry.replaced += 1
            await session.commit()
            return Submitted(entry, replaced=True, old_path=old_path if old_path != file_path else None)

    async def entries(self, challenge_id: int) -> list[ChallengeEntry]:
        """In voting order once numbered, else in submission order."""
        async with self.sessions() as session:
            return list(await session.scalars(
                select(ChallengeEntry).where(ChallengeEntry.challenge_id == challenge_id)
                .order_by(ChallengeEntry.position.is_(None), ChallengeEntry.position, ChallengeEntry.submitted_at,
                          ChallengeEntry.id)))

    async def entry(self, entry_id: int) -> ChallengeEntry | None:
        async with self.sessions() as session:
            return await session.get(ChallengeEntry, entry_id)

    async def entry_of(self, challenge_id: int, user_id: int) -> ChallengeEntry | None:
        async with self.sessions() as session:
            return await session.scalar(select(ChallengeEntry).where(
                ChallengeEntry.challenge_id == challenge_id, ChallengeEntry.user_id == user_id))

    async def open_voting(self, challenge_id: int, now: datetime | None = None,
                          rng: random.Random | None = None) -> list[ChallengeEntry] | None:
        """At the submission deadline: move `open` -> `voting` and number the entries, in
        one transaction. Returns the numbered entries, or None when it did not move (not
        open, not yet due, or another scheduler got there first). Anonymous challenges get
        a shuffled order (`rng`, default a fresh one)."""
        now = now or utcnow()
        async with self.sessions() as session:
            moved = await session.execute(
                update(Challenge).where(Challenge.id == challenge_id, Challenge.state == ChallengeState.open.value,
                                        Challenge.submit_deadline <= now)
                .values(state=ChallengeState.voting.value, updated_at=now))
            if rowcount(moved) != 1:
                await session.rollback()
                return None
            challenge = await session.get(Challenge, challenge_id)
            assert challenge is not None, "its row just moved, in this transaction"
            entries = list(await session.scalars(
                select(ChallengeEntry).where(ChallengeEntry.challenge_id == challenge_id)
                .order_by(ChallengeEntry.submitted_at, ChallengeEntry.id)))
            if challenge.anonymous:
                (rng or random.Random()).shuffle(entries)
            for position, entry in enumerate(entries, start=1):
                entry.position = position
            await session.commit()
            return entries

    async def claim_entry_post(self, entry_id: int) -> bool:
        """Claim the voting post of an entry (so that exactly one scheduler makes it)."""
        async with self.sessions() as session:
            moved = await session.execute(update(ChallengeEntry).where(
                ChallengeEntry.id == entry_id, ChallengeEntry.message_id.is_(None)).values(message_id=POSTING))
            await session.commit()
            return rowcount(moved) == 1

    async def set_entry_message(self, entry_id: int, message_id: int) -> None:
        async with self.sessions() as session:
            await session.execute(update(ChallengeEntry).where(ChallengeEntry.id == entry_id)
                                  .values(message_id=message_id))
            await session.commit()

    async def count_entries(self, challenge_id: int) -> int:
        async with self.sessions() as session:
            return await session.scalar(select(func.count()).select_from(ChallengeEntry)
                                        .where(ChallengeEntry.challenge_id == challenge_id)) or 0

    # -- votes -----------------------------------------------------------------------------------

    async def vote(self, voter_id: int, entry_id: int, now: datetime | None = None) -> Voted:
        """Vote for an entry, or move one's vote to it. Raises UnknownEntry, Closed (not
        during voting) or OwnEntry."""
        now = now or utcnow()
        async with self.sessions() as session:
            # The guard first: its write takes the lock before anything is read.
            challenge_of = select(ChallengeEntry.challenge_id).where(ChallengeEntry.id == entry_id).scalar_subquery()
            open_ = await self._guard(session, challenge_of, ChallengeState.voting, Challenge.vote_deadline, now)
            entry = await session.get(ChallengeEntry, entry_id)
            if entry is None:
                await session.rollback()
                raise UnknownEntry("that entry no longer exists")
            if not open_:
                await session.rollback()
                raise Closed("voting is closed for this challenge")
            if entry.user_id == voter_id:
                await session.rollback()
                raise OwnEntry("you can't vote for your own entry")
            vote = await session.scalar(select(ChallengeVote).where(
                ChallengeVote.challenge_id == entry.challenge_id, ChallengeVote.voter_id == voter_id))
            if vote is None:
                session.add(ChallengeVote(challenge_id=entry.challenge_id, voter_id=voter_id, entry_id=entry_id,
                                          voted_at=now))
                previous, unchanged = None, False
            else:
                previous, unchanged = vote.entry_id, vote.entry_id == entry_id
                if not unchanged:
                    vote.entry_id, vote.voted_at, vote.changes = entry_id, now, vote.changes + 1
            await session.commit()
            return Voted(entry, previous, unchanged)

    async def vote_of(self, challenge_id: int, voter_id: int) -> ChallengeVote | None:
        async with self.sessions() as session:
            return await session.scalar(select(ChallengeVote).where(
                ChallengeVote.challenge_id == challenge_id, ChallengeVote.voter_id == voter_id))

    async def count_votes(self, challenge_id: int) -> int:
        async with self.sessions() as session:
            return await session.scalar(select(func.count()).select_from(ChallengeVote)
                                        .where(ChallengeVote.challenge_id == challenge_id)) or 0

    async def tally(self, challenge_id: int) -> list[Standing]:
        """Entries ranked by votes; ties go to the earliest submission, then the lower id."""
        async with self.sessions() as session:
            votes = (select(ChallengeVote.entry_id, func.count().label("n")).where(
                ChallengeVote.challenge_id == challenge_id).group_by(ChallengeVote.entry_id).subquery())
            rows = (await session.execute(
                select(ChallengeEntry, func.coalesce(votes.c.n, 0))
                .outerjoin(votes, votes.c.entry_id == ChallengeEntry.id)
                .where(ChallengeEntry.challenge_id == challenge_id)
                .order_by(func.coalesce(votes.c.n, 0).desc(), ChallengeEntry.submitted_at, ChallengeEntry.id)
            )).all()
        return [Standing(rank, entry, int(n)) for rank, (entry, n) in enumerate(rows, start=1)]
