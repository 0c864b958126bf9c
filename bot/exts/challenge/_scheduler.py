"""The challenge scheduler: acts on every challenge whose time has come.

Durable like RoboDanny's timers: the deadlines live in SQL (`core.challenges`), and the
scheduler only asks `ChallengeStore.due(now)` what to do. It runs once when the bot
starts (so a deadline that passed while the bot was down is acted on at once), then
sleeps until the next deadline, at most `poll_s` (2 s: that is also how soon a finished
split opens its challenge), and is woken early when a challenge is created or ended.

Every action claims its work with a guarded transition before it posts anything (see
core.challenges), so a restart, a second scheduler, or a `/challenge end` racing the
deadline never posts twice. An action in progress when the bot stops is allowed to
finish (`stop`).

What it posts, all in the challenge's thread:
- split done: "Submissions are open"; split failed or cancelled: the challenge is cancelled.
- submission deadline: "Voting is open", then one message per entry with its audio file
  attached and a Vote button (`stembot:vote:<entry id>`). Anonymous challenges show
  "Entry <n>" only, with the file renamed `entry-<n>.<ext>`, in a shuffled order. No
  entries: the challenge is over, nothing to vote on.
- voting deadline: the results, ranked, with every author revealed. Entry files are
  then deleted from storage (the voting posts keep them on Discord).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import discord

from core.challenges import POSTING, Challenge, ChallengeEntry, ChallengeState, Standing
from core.db import utcnow
from core.jobs.job import JobState
from core.jobs.results import checked_analysis, shown_error
from core.media.audio import format_duration
from core.storage.local import safe_filename

from ._views import vote_view

log = logging.getLogger(__name__)

PAYLOAD_TOO_LARGE = 40005
MEDALS = {1: "🥇", 2: "🥈", 3: "🥉"}
MAX_RESULT_LINES = 25


def when(moment) -> str:
    return f"{discord.utils.format_dt(moment, 'f')} ({discord.utils.format_dt(moment, 'R')})"


def entry_label(challenge: Challenge, entry: ChallengeEntry, *, reveal: bool) -> str:
    label = f"**Entry {entry.position}**" if entry.position else "**Entry**"
    if reveal or not challenge.anonymous:
        label += f" by <@{entry.user_id}> — `{entry.original_name}`"
    if entry.duration_s:
        label += f" · {format_duration(entry.duration_s)}"
    return label


def render_results(challenge: Challenge, standings: list[Standing], votes: int) -> str:
    lines = [f"🏆 **Results — {challenge.title}**"]
    if not standings:
        lines.append("No entries were submitted.")
    for standing in standings[:MAX_RESULT_LINES]:
        count = f"{standing.votes} vote{'s' if standing.votes != 1 else ''}"
        lines.append(f"{MEDALS.get(standing.rank, f'{standing.rank}.')} "
                     f"{entry_label(challenge, standing.entry, reveal=True)} — **{count}**")
    if len(standings) > MAX_RESULT_LINES:
        lines.append(f"… and {len(standings) - MAX_RESULT_LINES} more entries.")
    lines.append(f"{votes} member{'s' if votes != 1 else ''} voted. Thanks to everyone who took part!")
    return "\n".join(lines)[:2000]


class ChallengeScheduler:
    def __init__(self, bot, services, poll_s: float = 2.0):
        self.bot = bot
        self.services = services
        self.store = services.challenges
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._acting: asyncio.Task | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="challenge-scheduler")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace_s: float = 20.0) -> None:
        """Stop acting on deadlines; an action under way may finish its posts."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        if self._acting is not None and not self._acting.done():
            await asyncio.wait({self._acting}, timeout=grace_s)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("challenge scheduler round failed")
            delay = self.poll_s
            try:
                upcoming = await self.store.next_deadline()
                if upcoming is not None:
                    delay = min(delay, (upcoming - utcnow()).total_seconds())
            except Exception:
                log.warning("could not read the next challenge deadline", exc_info=True)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.05))
            except TimeoutError:
                pass

    async def run_due(self) -> None:
        for challenge in await self.store.due(utcnow()):
            # Shielded: a shutdown waits for the action (see stop) instead of cutting its posts off.
            self._acting = asyncio.ensure_future(self._act(challenge))
            try:
                await asyncio.shield(self._acting)
            except asyncio.CancelledError:
                raise
            except (discord.NotFound, discord.Forbidden) as exc:
                # The thread was deleted, or stembot may no longer post in it: nothing more
                # can happen there, and trying every round would only fail again.
                log.warning("challenge %s: its thread %s is unusable (%s); cancelling it", challenge.id,
                            challenge.thread_id, exc)
                await self.cancel(challenge, "its thread is gone or closed to stembot", post=False)
            except Exception:
                log.exception("challenge %s: acting on its deadline failed", challenge.id)

    async def _act(self, challenge: Challenge) -> None:
        state = challenge.challenge_state
        if state is ChallengeState.splitting:
            await self.after_split(challenge)
        elif state is ChallengeState.open:
            await self.open_voting(challenge)
        elif state is ChallengeState.voting:
            if challenge.vote_deadline <= utcnow():
                await self.close_voting(challenge)
            else:
                await self.post_entries(challenge)

    # -- actions -----------------------------------------------------------------------------

    def thread(self, challenge: Challenge):
        return self.bot.get_partial_messageable(challenge.thread_id, guild_id=challenge.guild_id)

    async def after_split(self, challenge: Challenge) -> None:
        job = await self.services.store.get(challenge.job_id) if challenge.job_id else None
        if job is not None and job.job_state is JobState.done:
            if await self.store.transition(challenge.id, ChallengeState.open):
                # Checked like the stems' message: a worker wrote it.
                analysis = checked_analysis(job.artifacts)
                track = f" The track: {analysis.describe()}." if analysis is not None else ""
                await self.thread(challenge).send(
                    f"📣 **Submissions are open** until {when(challenge.submit_deadline)}.{track} Remix the stems "
                    "above and send your entry with `/challenge submit` in this thread: one entry per member, which "
                    "you can replace until the deadline.")
                log.info("challenge %s: open", challenge.id)
            return
        if job is not None and not job.is_final:
            return
        if job is None:
            reason = "the track was never queued for splitting"
        elif job.job_state is JobState.cancelled:
            reason = "the split of the track was cancelled"
        else:
            reason = f"the track couldn't be split ({shown_error(job)})"
        await self.cancel(challenge, reason)

    async def cancel(self, challenge: Challenge, reason: str, by: int | None = None, *, post: bool = True) -> bool:
        """Cancel a challenge that has not ended, and its split if it still runs. Returns
        whether this call cancelled it."""
        if not await self.store.transition(challenge.id, ChallengeState.cancelled, ended_by=by, end_reason=reason):
            return False
        if challenge.job_id and self.services.dispatcher is not None:
            await self.services.dispatcher.cancel(challenge.job_id)
        log.info("challenge %s: cancelled (%s)", challenge.id, reason)
        await self._delete_files(challenge)
        if post:
            await self.thread(challenge).send(f"✖️ **Challenge cancelled:** {reason}.",
                                              allowed_mentions=discord.AllowedMentions.none())
        return True

    async def open_voting(self, challenge: Challenge) -> None:
        entries = await self.store.open_voting(challenge.id, utcnow())
        if entries is None:
            return  # not due yet, or another scheduler opened it
        log.info("challenge %s: voting open with %d entries", challenge.id, len(entries))
        if not entries:
            if await self.store.transition(challenge.id, ChallengeState.closed, result_message_id=POSTING):
                message = await self.thread(challenge).send(
                    "⏹️ Submissions closed without a single entry; the challenge is over.")
                await self.store.update(challenge.id, result_message_id=message.id)
                await self._delete_files(challenge)
            return
        hidden = " Authors stay hidden until the results." if challenge.anonymous else ""
        await self.thread(challenge).send(
            f"🗳️ **Voting is open** until {when(challenge.vote_deadline)}. Listen to the {len(entries)} "
            f"entr{'ies' if len(entries) != 1 else 'y'} below and press **Vote** under your favourite: one vote per "
            f"member (press another to change it), and not for your own.{hidden}")
        await self.post_entries(challenge)

    async def post_entries(self, challenge: Challenge) -> None:
        """Post the entries that have no voting post yet, each claimed first."""
        for entry in await self.store.entries(challenge.id):
            if entry.message_id is None and await self.store.claim_entry_post(entry.id):
                message = await self._post_entry(challenge, entry)
                await self.store.set_entry_message(entry.id, message.id)

    async def _post_entry(self, challenge: Challenge, entry: ChallengeEntry) -> discord.Message:
        path = self.services.storage.root / entry.file_path
        suffix = Path(entry.file_path).suffix
        name = f"entry-{entry.position}{suffix}" if challenge.anonymous else safe_filename(entry.original_name)
        if not name.endswith(suffix):
            name += suffix
        content = entry_label(challenge, entry, reveal=False)
        thread = self.thread(challenge)
        none = discord.AllowedMentions.none()
        if path.is_file():
            try:
                return await thread.send(content, file=discord.File(path, filename=name),
                                         view=vote_view(entry.id), allowed_mentions=none)
            except discord.HTTPException as exc:
                if exc.status != 413 and exc.code != PAYLOAD_TOO_LARGE:
                    raise
                content += "\n*(the file is too large to post here)*"
        else:
            log.warning("challenge %s: entry %s has no file at %s", challenge.id, entry.id, path)
            content += "\n*(the file is missing)*"
        return await thread.send(content, view=vote_view(entry.id), allowed_mentions=none)

    async def close_voting(self, challenge: Challenge, by: int | None = None) -> bool:
        """Close the vote and post the results. Returns whether this call closed it."""
        if not await self.store.transition(challenge.id, ChallengeState.closed, result_message_id=POSTING,
                                           ended_by=by):
            return False
        standings = await self.store.tally(challenge.id)
        votes = await self.store.count_votes(challenge.id)
        log.info("challenge %s: closed, %d entries, %d votes", challenge.id, len(standings), votes)
        message = await self.thread(challenge).send(render_results(challenge, standings, votes))
        await self.store.update(challenge.id, result_message_id=message.id)
        await self._delete_files(challenge)
        return True

    async def _delete_files(self, challenge: Challenge) -> None:
        folder = self.services.storage.root / "challenges" / str(int(challenge.id))
        await asyncio.to_thread(shutil.rmtree, folder, True)
