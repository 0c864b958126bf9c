"""`/challenge`: remix challenges.

- `/challenge start title: rules: submissions: voting: [file:|url:] [stems:] [format:]
  [anonymous:]` — who may run it is a server setting: members with Manage Server, and
  members with the role set by `/stembot challenges role:`. The bot checks this itself
  (the group is visible to everyone, since everyone may submit and vote). `submissions`
  is how long entries are taken, `voting` how long the vote lasts after that, both
  written like `3d`, `36h`, `90m`, `1d12h` or `30s` (10 s to 90 days). The answer is a
  public announcement; a thread is started from it with the rules, and the track is
  queued as a bulk job (priority 10, behind interactive /split jobs) on the host's
  quota, like any job they ask for. The job's channel is the thread and it carries no
  interaction token, so the split extension delivers the stems pack into the thread
  (attachments, or links when they do not fit), with no change to it.
- `/challenge submit file:|url: [challenge:]` — during the submission window only. The
  entry is checked like any input (an audio or video file with an audio track, within
  the length limits of the member's policy and the bot's) and must fit this server's
  upload limit, so that it can be attached to its voting post. Links go through the
  same safe fetcher as /split (direct links only; no YouTube or SoundCloud), and files
  only from the Discord CDN origins (STEMBOT_DISCORD_CDN_URL), as for /split. Stored as
  `challenges/<id>/entries/<user>.<ext>` under the storage root; a new entry replaces
  the old one, up to STEMBOT_CHALLENGE_SUBMISSIONS_PER_MEMBER submissions per member and
  challenge. A member checks one entry at a time (download and probe), and the bot at
  most STEMBOT_CHALLENGE_CHECKS_AT_ONCE; more are refused at once, not queued. Every
  answer is ephemeral: in anonymous mode nobody sees who took part.
- Votes: the Vote button under each entry (see _scheduler.py); answers are ephemeral.
- `/challenge status [challenge:]`, `/challenge list` — for everyone; the ranking once
  closed. `/challenge end [challenge:]` (host or Manage Server): during voting, closes
  the vote and posts the results now; before voting, cancels the challenge (and its
  split, if still running).

Without `challenge:`, a command means the challenge of the thread it is used in, else
the server's only running challenge.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import PurePosixPath

import discord
from discord import app_commands
from discord.ext import commands

from core.challenges import (
    ACTIVE,
    Challenge,
    ChallengeError,
    ChallengeState,
    TooManySubmissions,
    parse_duration,
    submissions,
)
from core.db import utcnow
from core.errors import InputError
from core.media.audio import Limits, format_duration, probe
from core.media.upload_plan import human_size
from core.net import ytdl
from core.net.fetcher import download
from core.storage.local import safe_filename

from ..split._cog import MEDIA_EXTENSIONS, FormatChoice, StemsChoice, _role_ids, _source, is_media, quota_refusal
from ._scheduler import ChallengeScheduler, render_results, when

log = logging.getLogger(__name__)

BULK_PRIORITY = 10  # interactive jobs are 0: a challenge's split waits behind them
MAX_RULES = 1500
THREAD_ARCHIVE_MINUTES = 10080  # a week, Discord's longest
# ffprobe's container names -> a file extension Discord plays inline.
CONTAINER_SUFFIX = {"mp3": ".mp3", "wav": ".wav", "flac": ".flac", "ogg": ".ogg", "mov": ".m4a", "matroska": ".mka",
                    "aiff": ".aiff", "aac": ".aac"}
STATE_LABEL = {"splitting": "splitting the track", "open": "taking entries", "voting": "voting",
               "closed": "closed", "cancelled": "cancelled"}


class Challenges(commands.Cog):
    challenge = app_commands.Group(
        name="challenge", description="Remix challenges: a track's stems for everyone, remixes, a vote",
        allowed_contexts=app_commands.AppCommandContext(guild=True),
    )

    def __init__(self, bot):
        self.bot = bot
        self.services = bot.services
        self.scheduler = ChallengeScheduler(bot, bot.services) if bot.services is not None else None
        # Members whose entry is being downloaded and probed: one each, and a few in all.
        # One bot per database takes the commands (core/ops/bot_lock.py): a set in memory is the lock.
        self._checking: set[int] = set()

    async def cog_load(self) -> None:
        if self.scheduler is not None:
            self.services.add_background(self.scheduler)
            self.scheduler.start()

    async def cog_unload(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()

    @property
    def store(self):
        return self.services.challenges

    @property
    def running_scheduler(self) -> ChallengeScheduler:
        """The scheduler, for a command. It exists whenever the services do: only `stembot
        sync` builds the bot without them, and it registers the commands without running one."""
        assert self.scheduler is not None, "challenge commands run only on a bot with services"
        return self.scheduler

    async def _reply(self, interaction: discord.Interaction, text: str) -> None:
        none = discord.AllowedMentions.none()
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=none)
        else:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=none)

    # -- finding the challenge a command is about --------------------------------------------

    async def _find(self, interaction: discord.Interaction, challenge_id: int | None,
                    *, latest: bool = False) -> Challenge | str:
        """The challenge a command is about, or why there is none (to tell the member)."""
        if challenge_id is not None:
            challenge = await self.store.get(challenge_id)
            if challenge is None or challenge.guild_id != interaction.guild_id:
                return f"There is no challenge #{challenge_id} in this server."
            return challenge
        challenge = await self.store.in_thread(interaction.channel_id)
        if challenge is not None:
            return challenge
        running = await self.store.for_guild(interaction.guild_id, states=ACTIVE)
        if len(running) == 1:
            return running[0]
        if len(running) > 1:
            return ("Several challenges are running here: use the command in the challenge's thread, or pick "
                    "one with `challenge:`.")
        if latest:
            recent = await self.store.for_guild(interaction.guild_id, limit=1)
            if recent:
                return recent[0]
        return "There's no remix challenge running in this server."

    async def challenge_autocomplete(self, interaction: discord.Interaction, current: str):
        challenges = await self.store.for_guild(interaction.guild_id, limit=25)
        current = current.lower()
        return [app_commands.Choice(name=f"#{c.id} {c.title} ({c.state})"[:100], value=c.id)
                for c in challenges if current in f"#{c.id} {c.title}".lower()][:25]

    # -- /challenge start ----------------------------------------------------------------------

    @challenge.command(name="start", description="Start a remix challenge: the track's stems go to everyone")
    @app_commands.describe(
        title="the challenge's name (also its thread's)", rules="what remixers must know: the brief, the rules",
        submissions="how long entries are taken, e.g. 3d, 36h, 90m",
        voting="how long the vote lasts after that, e.g. 2d",
        file="the track (audio or video file)", url="a link to the track instead of a file",
        stems="which stems to publish (default: all)", format="file format of the stems (default: the server's)",
        anonymous="hide who made each entry until the results (default: no)",
    )
    async def start(self, interaction: discord.Interaction, title: app_commands.Range[str, 1, 100], rules: str,
                    submissions: str, voting: str, file: discord.Attachment | None = None, url: str | None = None,
                    stems: StemsChoice = "all", format: FormatChoice | None = None, anonymous: bool = False) -> None:
        services = self.services
        policy = await services.quotas.policy(interaction.guild_id, _role_ids(interaction))
        if not self._may_start(interaction, policy):
            also = f" or the <@&{policy.challenge_role_id}> role" if policy.challenge_role_id else ""
            await self._reply(interaction, f"Only members with the Manage Server permission{also} can start remix "
                                           "challenges here.")
            return
        reason = None
        try:
            submit_span = parse_duration(submissions)
            vote_span = parse_duration(voting)
        except ValueError as exc:
            reason = f"Deadlines: {exc}."
        title, rules = title.strip(), rules.strip()
        if reason is None and not title:
            reason = "Give the challenge a title."
        elif reason is None and len(rules) > MAX_RULES:
            reason = f"The rules are {len(rules)} characters long; keep them under {MAX_RULES}."
        elif reason is None and isinstance(interaction.channel, discord.Thread):
            reason = "Start a challenge in a text channel, not in a thread: it gets a thread of its own."
        model = policy.default_model or services.settings.model
        fmt = format or policy.default_format or "mp3"
        split = self.bot.get_cog("Split")
        if reason is None:
            reason = split.refusal(policy, interaction.channel_id, file, url, model, fmt)
        if reason is None:
            # Checked before anything is posted; admission below takes the slot for real.
            reason = await quota_refusal(services, interaction, policy, slots=True)
        if reason is not None:
            await self._reply(interaction, reason)
            return

        submit_deadline = utcnow() + submit_span
        vote_deadline = submit_deadline + vote_span
        source = _source(file, url)
        hidden = " Entries are anonymous until the results." if anonymous else ""
        await interaction.response.send_message(
            f"🎛️ **Remix challenge: {title}** — hosted by <@{interaction.user.id}>\n"
            f"The stems of `{source['source_name']}` are on their way to the thread below. Submissions until "
            f"{when(submit_deadline)}, then voting until {when(vote_deadline)}.{hidden}",
            allowed_mentions=discord.AllowedMentions.none())
        announcement = await interaction.original_response()
        try:
            payload = await self.bot.http.start_thread_with_message(
                interaction.channel_id, announcement.id, name=title, auto_archive_duration=THREAD_ARCHIVE_MINUTES,
                reason="remix challenge")
        except discord.HTTPException as exc:
            log.warning("challenge thread refused in channel %s: %s", interaction.channel_id, exc)
            await interaction.edit_original_response(content=(
                f"Couldn't open a thread for the challenge **{title}** here; stembot needs the Create Public "
                "Threads permission in this channel."))
            return
        thread_id = int(payload["id"])
        challenge = await self.store.create(
            guild_id=interaction.guild_id, channel_id=interaction.channel_id, thread_id=thread_id,
            announcement_message_id=announcement.id, host_id=interaction.user.id, title=title, rules=rules,
            source_name=source["source_name"], stems=stems, format=fmt, anonymous=anonymous,
            submit_deadline=submit_deadline, vote_deadline=vote_deadline,
        )
        thread = self.bot.get_partial_messageable(thread_id, guild_id=interaction.guild_id)
        await thread.send(self._rules_text(challenge), allowed_mentions=discord.AllowedMentions.none())
        job, refusal = await services.dispatcher.submit(
            policy, user_id=interaction.user.id, guild_id=interaction.guild_id, channel_id=thread_id,
            application_id=interaction.application_id, attachment_size_limit=interaction.filesize_limit,
            **source, model=model, stems=stems, format=fmt, priority=BULK_PRIORITY,
        )
        if refusal is not None:
            await self.running_scheduler.cancel(challenge, f"the track couldn't be queued: {refusal}")
            return
        await self.store.update(challenge.id, job_id=job.id)
        log.info("challenge %s started by %s: job %s, thread %s", challenge.id, interaction.user.id, job.id,
                 thread_id)
        self.running_scheduler.wake()

    @staticmethod
    def _may_start(interaction: discord.Interaction, policy) -> bool:
        if interaction.permissions.manage_guild:
            return True
        return policy.challenge_role_id is not None and policy.challenge_role_id in _role_ids(interaction)

    def _rules_text(self, challenge: Challenge) -> str:
        lines = [f"📜 **Rules — {challenge.title}**", challenge.rules or "*(no rules given)*", "",
                 "**How it works**",
                 "• The stems of the track are posted here as soon as it is split.",
                 f"• Send your remix with `/challenge submit file:` in this thread before "
                 f"{when(challenge.submit_deadline)}. One entry per member; submitting again replaces yours "
                 f"({self.services.settings.challenge_submissions_per_member} submissions at most).",
                 f"• Voting opens then, until {when(challenge.vote_deadline)}: one vote per member, not for your own "
                 "entry, and you can change it.",
                 "• Entries are anonymous until the results." if challenge.anonymous else
                 "• Each entry is posted with its author's name.",
                 "• The results are posted here, with the authors."]
        return "\n".join(lines)[:2000]

    # -- /challenge submit ---------------------------------------------------------------------

    @challenge.command(name="submit", description="Send your remix to a challenge (again to replace it)")
    @app_commands.describe(file="your remix (an audio file)", url="a link to your remix instead of a file",
                           challenge="which challenge (default: this thread's, or the only one running)")
    async def submit(self, interaction: discord.Interaction, file: discord.Attachment | None = None,
                     url: str | None = None, challenge: int | None = None) -> None:
        found = await self._find(interaction, challenge)
        if isinstance(found, str):
            await self._reply(interaction, found)
            return
        if found.challenge_state is ChallengeState.splitting:
            await self._reply(interaction, f"Submissions for **{found.title}** open once the stems are posted.")
            return
        if found.challenge_state is not ChallengeState.open or utcnow() >= found.submit_deadline:
            await self._reply(interaction, f"Submissions are closed for **{found.title}**.")
            return
        policy = await self.services.quotas.policy(interaction.guild_id, _role_ids(interaction))
        reason = self._entry_refusal(interaction, policy, file, url)
        if reason is None:
            reason = await self._submissions_refusal(interaction, found)
        # No await between this check and taking the place: two submissions of one member
        # arriving together cannot both pass it.
        if reason is None:
            reason = self._checking_refusal(interaction.user.id)
        if reason is not None:
            await self._reply(interaction, reason)
            return
        self._checking.add(interaction.user.id)
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
            try:
                text = await self._store_entry(interaction, found, policy, file, url)
            except InputError as exc:
                text = f"Your entry was refused: {exc.reason}."
            except TooManySubmissions as exc:
                text = f"{exc.reason[0].upper()}{exc.reason[1:]}."
            except ChallengeError as exc:
                text = f"{exc.reason[0].upper()}{exc.reason[1:]}: **{found.title}** took no new entries."
        finally:
            self._checking.discard(interaction.user.id)
        await self._reply(interaction, text)

    async def _submissions_refusal(self, interaction: discord.Interaction, challenge: Challenge) -> str | None:
        """Refused before any download when the member has no submission left (the store
        checks again when it saves the entry)."""
        most = self.services.settings.challenge_submissions_per_member
        sent = submissions(await self.store.entry_of(challenge.id, interaction.user.id))
        if sent >= most:
            return (f"You have sent {sent} entries to **{challenge.title}**, the most allowed; your current entry "
                    "stays.")
        return None

    def _checking_refusal(self, user_id: int) -> str | None:
        if user_id in self._checking:
            return "Your previous entry is still being checked; wait for its answer before you send another."
        if len(self._checking) >= self.services.settings.challenge_checks_at_once:
            return "Too many entries are being checked right now; try again in a minute."
        return None

    def _entry_refusal(self, interaction: discord.Interaction, policy, file: discord.Attachment | None,
                       url: str | None) -> str | None:
        settings = self.services.settings
        if url is not None and file is None:
            if ytdl.is_streaming_link(url.strip()):
                return "YouTube and SoundCloud links can't be entries; attach the file or link to it directly."
            return self.bot.get_cog("Split").link_refusal(policy, url)
        if file is None or url is not None:
            return "Attach your remix with `file:` or give a link with `url:` (one of the two)."
        if not is_media(file):
            return f"`{file.filename}` isn't an audio file. Attach an mp3, wav, flac, ogg or m4a."
        reason = self.bot.get_cog("Split").attachment_refusal(file)
        if reason is not None:
            return reason
        limit = min(settings.max_input_bytes, interaction.filesize_limit)
        if file.size > limit:
            return (f"`{file.filename}` is {human_size(file.size)}; entries can be up to {human_size(limit)} so that "
                    "they can be posted for the vote.")
        return None

    async def _store_entry(self, interaction: discord.Interaction, challenge: Challenge, policy,
                           file: discord.Attachment | None, url: str | None) -> str:
        settings = self.services.settings
        user = interaction.user.id
        folder = self.services.storage.root / "challenges" / str(challenge.id) / "entries"
        source = _source(file, url)
        limit = min(settings.max_input_bytes, interaction.filesize_limit)
        temporary = folder / f".{user}-{secrets.token_hex(4)}.part"
        try:
            # An attachment only from the Discord CDN origins, a link under the link rules.
            rules = self.services.fetch_rules.for_kind(source["source_kind"])
            size = await download(source["source_url"], temporary, limit, rules=rules)
            limits = Limits(settings.min_duration_s, min(settings.max_duration_s, policy.max_track_minutes * 60),
                            limit)
            info = await asyncio.to_thread(probe, temporary, limits)
            final = folder / f"{user}{_suffix(source['source_name'], info.container)}"
            relative = final.relative_to(self.services.storage.root).as_posix()
            result = await self.store.submit_entry(
                challenge.id, user, file_path=relative, original_name=safe_filename(source["source_name"], "entry"),
                duration_s=info.duration_s, size_bytes=size,
                max_submissions=settings.challenge_submissions_per_member)
            temporary.replace(final)
        finally:
            temporary.unlink(missing_ok=True)
        if result.old_path:
            (self.services.storage.root / result.old_path).unlink(missing_ok=True)
        length = f" ({format_duration(info.duration_s)})" if info.duration_s else ""
        if result.replaced:
            return (f"🔁 Replaced your entry for **{challenge.title}** with `{result.entry.original_name}`{length}. "
                    f"You can replace it until {when(challenge.submit_deadline)}.")
        return (f"✅ Your entry `{result.entry.original_name}`{length} is in for **{challenge.title}**. Submit "
                f"again to replace it, until {when(challenge.submit_deadline)}.")

    # -- votes -----------------------------------------------------------------------------------

    async def vote_from_button(self, interaction: discord.Interaction, entry_id: int) -> None:
        try:
            voted = await self.store.vote(interaction.user.id, entry_id)
        except ChallengeError as exc:
            await self._reply(interaction, f"{exc.reason[0].upper()}{exc.reason[1:]}.")
            return
        number = f"Entry {voted.entry.position}"
        if voted.unchanged:
            text = f"Your vote is already on **{number}**."
        elif voted.previous_entry_id is not None:
            previous = await self.store.entry(voted.previous_entry_id)
            was = f"Entry {previous.position}" if previous is not None else "your earlier choice"
            text = f"🔁 Vote changed from **{was}** to **{number}**."
        else:
            text = f"🗳️ Vote recorded for **{number}**. Press another entry's button to change it."
        await self._reply(interaction, text)

    # -- /challenge status, list, end --------------------------------------------------------

    @challenge.command(name="status", description="Where a challenge stands")
    @app_commands.describe(challenge="which challenge (default: this thread's, or the only one running)")
    async def status(self, interaction: discord.Interaction, challenge: int | None = None) -> None:
        found = await self._find(interaction, challenge, latest=True)
        if isinstance(found, str):
            await self._reply(interaction, found)
            return
        state = found.challenge_state
        lines = [f"**#{found.id} {found.title}** — {STATE_LABEL[found.state]}"
                 + (f" · <#{found.thread_id}>" if found.thread_id else ""),
                 f"Host: <@{found.host_id}> · track `{found.source_name}` · stems {found.stems}, "
                 f"{found.format}" + (" · anonymous" if found.anonymous else "")]
        if state in ACTIVE:
            lines.append(f"Submissions until {when(found.submit_deadline)}; voting until "
                         f"{when(found.vote_deadline)}.")
        entries = await self.store.count_entries(found.id)
        if state is ChallengeState.closed:
            standings = await self.store.tally(found.id)
            lines.append(render_results(found, standings, await self.store.count_votes(found.id)))
        elif state is ChallengeState.cancelled:
            lines.append(f"Cancelled: {found.end_reason or 'no reason given'}.")
        else:
            lines.append(f"Entries: {entries}.")
            mine = await self.store.entry_of(found.id, interaction.user.id)
            if mine is not None:
                number = f" (Entry {mine.position})" if mine.position else ""
                lines.append(f"Your entry: `{mine.original_name}`{number}.")
            if state is ChallengeState.voting:
                lines.append(f"Votes so far: {await self.store.count_votes(found.id)}.")
                vote = await self.store.vote_of(found.id, interaction.user.id)
                if vote is not None:
                    voted_for = await self.store.entry(vote.entry_id)
                    lines.append(f"Your vote: Entry {voted_for.position}.")
        await self._reply(interaction, "\n".join(lines)[:2000])

    @challenge.command(name="list", description="This server's remix challenges")
    async def list_(self, interaction: discord.Interaction) -> None:
        challenges = await self.store.for_guild(interaction.guild_id, limit=15)
        if not challenges:
            await self._reply(interaction, "No remix challenges in this server yet.")
            return
        lines = []
        for c in challenges:
            line = f"`#{c.id}` **{c.title}** — {STATE_LABEL[c.state]}"
            if c.thread_id:
                line += f" · <#{c.thread_id}>"
            if c.next_deadline is not None:
                line += f" · until {discord.utils.format_dt(c.next_deadline, 'R')}"
            lines.append(line)
        await self._reply(interaction, "\n".join(lines)[:2000])

    @challenge.command(name="end", description="End a challenge now: results if voting, else cancel it")
    @app_commands.describe(challenge="which challenge (default: this thread's, or the only one running)")
    async def end(self, interaction: discord.Interaction, challenge: int | None = None) -> None:
        found = await self._find(interaction, challenge)
        if isinstance(found, str):
            await self._reply(interaction, found)
            return
        if interaction.user.id != found.host_id and not interaction.permissions.manage_guild:
            await self._reply(interaction, "Only the host or a member with Manage Server can end this challenge.")
            return
        state = found.challenge_state
        if state in (ChallengeState.closed, ChallengeState.cancelled):
            await self._reply(interaction, f"**{found.title}** has already ended ({found.state}).")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        if state is ChallengeState.voting:
            done = await self.running_scheduler.close_voting(found, by=interaction.user.id)
            text = f"Voting closed; the results of **{found.title}** are in <#{found.thread_id}>."
        else:
            done = await self.running_scheduler.cancel(found, f"ended by <@{interaction.user.id}> before the vote",
                                                       by=interaction.user.id)
            text = f"**{found.title}** is cancelled."
        if not done:
            fresh = await self.store.get(found.id)
            text = f"**{found.title}** moved on meanwhile (it is now {fresh.state}); nothing was changed."
        await self._reply(interaction, text)

    submit.autocomplete("challenge")(challenge_autocomplete)
    status.autocomplete("challenge")(challenge_autocomplete)
    end.autocomplete("challenge")(challenge_autocomplete)


def _suffix(name: str, container: str) -> str:
    suffix = PurePosixPath(name.lower()).suffix
    if suffix in MEDIA_EXTENSIONS:
        return suffix
    return CONTAINER_SUFFIX.get(container.split(",")[0], ".bin")
