"""Slash commands for splitting: /split, /karaoke, /mix, "Split stems", /queue, /cancel, /help.

Thin on purpose: it checks what can be checked at once (answering with an ephemeral
message within Discord's 3 s), defers, and hands the job to the dispatcher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import PurePosixPath
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.timely import TimelyAnswer
from core.errors import BadRequestError, LinkNotAllowedError
from core.jobs.job import RUNNING, Job, JobState
from core.jobs.quotas import format_factor
from core.jobs.render_request import mix_request, split_render
from core.media.audio import format_duration
from core.media.render import TEMPO_MAX, TEMPO_MIN, TRANSPOSE_MAX, TRANSPOSE_MIN, RenderOptions
from core.media.upload_plan import human_size
from core.net import ytdl
from core.net.fetcher import check_url
from core.net.urls import link_output_name
from core.separation.installed import cost_factor_for
from core.separation.model_choice import DIALOGUE, Offer, Request, choose, offers

from ._status import STAGES

log = logging.getLogger(__name__)

MEDIA_EXTENSIONS = {
    ".mp3", ".wav", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff", ".caf",
    ".wv", ".ape", ".mka", ".webm", ".mp4", ".m4v", ".mov", ".mkv", ".avi", ".flv", ".3gp", ".ac3", ".mpg",
}
# An interaction token lives 15 minutes; keep a margin for the last edit.
TOKEN_LIFETIME = timedelta(minutes=15)

StemsChoice = Literal["all", "karaoke", "vocals", "drums", "bass", "other", "dialogue"]
# Models chosen in plain words (core.separation.model_choice).
QualityChoice = Literal["fast", "best"]
BackingChoice = Literal["keep", "remove"]
CleanChoice = Literal["dereverb", "denoise"]
# Discord's client keeps the numbers within these; the bot checks them again (core.media.render).
TempoRange = app_commands.Range[int, TEMPO_MIN, TEMPO_MAX]
TransposeRange = app_commands.Range[int, TRANSPOSE_MIN, TRANSPOSE_MAX]
PLAIN = RenderOptions()  # the stems as separated
FormatChoice = Literal["mp3", "opus", "flac", "wav"]


def is_media(attachment: discord.Attachment) -> bool:
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    if content_type.startswith(("audio/", "video/")):
        return True
    return PurePosixPath(attachment.filename.lower()).suffix in MEDIA_EXTENSIONS


class Split(commands.Cog):
    def __init__(self, bot):
        self.bot = bot
        self.services = bot.services
        # Context menus cannot be declared inside a cog class: build it here.
        self.split_menu = app_commands.ContextMenu(name="Split stems", callback=self.split_message)
        bot.tree.add_command(self.split_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.split_menu.name, type=self.split_menu.type)

    # -- commands ----------------------------------------------------------------------

    @app_commands.command(name="split", description="Split a song into stems: vocals, drums, bass, other")
    @app_commands.describe(
        file="the song (audio or video file)", url="a link to the song instead of a file",
        stems="which stems you want (default: all; dialogue: speech, music and effects)",
        format="file format of the stems (default: mp3)",
        model="separation model (default: the server's)",
        tempo="speed in percent of the original, 50 to 150, keeping the key (default: 100)",
        transpose="semitones up or down, -12 to 12, keeping the speed (default: 0)",
        quality="fast, or best (a better model; its minutes count more, see /quota)",
        clean="a cleaner acapella: without reverb, or without noise",
    )
    async def split(self, interaction: discord.Interaction, file: discord.Attachment | None = None,
                    url: str | None = None, stems: StemsChoice = "all", format: FormatChoice | None = None,
                    model: str | None = None, tempo: TempoRange | None = None,
                    transpose: TransposeRange | None = None, quality: QualityChoice | None = None,
                    clean: CleanChoice | None = None) -> None:
        render = await _render_or_refuse(interaction, tempo, transpose)
        if render is not None:
            await self.start_job(interaction, file, url, stems, format, model, render,
                                 words=PlainWords(quality=quality, clean=clean))

    @app_commands.command(name="mix", description="One file of the stems you choose, at your volumes, speed and key")
    @app_commands.describe(
        file="the song (audio or video file)", url="a link to the song instead of a file",
        without="stems to leave out, e.g. drums (default: none)",
        stems="stems to keep instead, e.g. vocals,bass,other (default: all)",
        volumes="volumes in percent, 0 to 200, e.g. vocals=50 bass=120 (default: 100 each)",
        tempo="speed in percent of the original, 50 to 150, keeping the key (default: 100)",
        transpose="semitones up or down, -12 to 12, keeping the speed (default: 0)",
        format="file format (default: mp3)", model="separation model (default: the server's)",
    )
    async def mix(self, interaction: discord.Interaction, file: discord.Attachment | None = None,
                  url: str | None = None, without: str | None = None, stems: str | None = None,
                  volumes: str | None = None, tempo: TempoRange | None = None,
                  transpose: TransposeRange | None = None, format: FormatChoice | None = None,
                  model: str | None = None) -> None:
        await self.start_job(interaction, file, url, "all", format, model,
                             mix=MixArgs(stems, without, volumes, tempo, transpose))

    @app_commands.command(name="karaoke", description="Make a karaoke track: vocals and instrumental")
    @app_commands.describe(file="the song (audio or video file)", url="a link to the song instead of a file",
                           format="file format (default: mp3)", model="separation model (default: the server's)",
                           tempo="speed in percent of the original, 50 to 150, keeping the key (default: 100)",
                           transpose="semitones up or down to suit your voice, -12 to 12 (default: 0)",
                           quality="fast, or best (a better vocal model; its minutes count more, see /quota)",
                           backing_vocals="keep: only the lead vocal is removed; remove: every vocal (default)")
    async def karaoke(self, interaction: discord.Interaction, file: discord.Attachment | None = None,
                      url: str | None = None, format: FormatChoice | None = None, model: str | None = None,
                      tempo: TempoRange | None = None, transpose: TransposeRange | None = None,
                      quality: QualityChoice | None = None, backing_vocals: BackingChoice | None = None) -> None:
        # A singer practising moves the backing track into their key, or slows it down.
        render = await _render_or_refuse(interaction, tempo, transpose)
        if render is not None:
            await self.start_job(interaction, file, url, "karaoke", format, model, render,
                                 words=PlainWords(quality=quality, backing_vocals=backing_vocals))

    @split.autocomplete("model")
    @karaoke.autocomplete("model")
    @mix.autocomplete("model")
    async def model_autocomplete(self, interaction: discord.Interaction, current: str):
        current = current.lower()
        return [app_commands.Choice(name=name, value=name)
                for name in self.services.available_models() if current in name.lower()][:25]

    async def split_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        media = next((a for a in message.attachments if is_media(a)), None)
        if media is None:
            await interaction.response.send_message(
                "That message has no audio or video attachment to split.", ephemeral=True)
            return
        await self.start_job(interaction, media, None, "all", None, None)

    @app_commands.command(name="queue", description="Your jobs and the queue")
    async def queue(self, interaction: discord.Interaction) -> None:
        async with TimelyAnswer(interaction, ephemeral=True) as answer:
            await answer.send(await self._queue_text(interaction.user.id))

    async def _queue_text(self, user_id: int) -> str:
        store = self.services.store
        jobs = await store.for_user(user_id)
        length = await store.queue_length()
        lines = []
        for job in jobs:
            icon, label = STAGES.get(job.job_state, ("•", job.state))
            detail = label
            if job.job_state is JobState.queued:
                snapshot = await store.queue_snapshot(job.id)
                detail = f"queued, position {snapshot.position} of {snapshot.length}"
            elif job.job_state is JobState.separating:
                detail = f"separating, {job.progress * 100:.0f}%"
            lines.append(f"{icon} `#{job.id}` `{job.source_name}` — {detail}")
        body = "\n".join(lines) if lines else "You have no jobs in progress."
        waiting = "nobody is waiting" if length == 0 else f"{length} job{'s' if length != 1 else ''} waiting"
        return f"{body}\n\nQueue: {waiting}."

    @app_commands.command(name="cancel", description="Cancel your latest job, or the job with this number")
    @app_commands.describe(job="the job number (see /queue)")
    async def cancel(self, interaction: discord.Interaction, job: int | None = None) -> None:
        async with TimelyAnswer(interaction, ephemeral=True) as answer:
            if job is None:
                mine = await self.services.store.for_user(interaction.user.id, states=(JobState.queued, *RUNNING),
                                                          limit=1)
                if not mine:
                    await answer.send("You have no job to cancel.")
                    return
                job = mine[0].id
            await answer.send(await self._cancel(interaction, job))

    async def cancel_from_button(self, interaction: discord.Interaction, job_id: int) -> None:
        async with TimelyAnswer(interaction, ephemeral=True) as answer:
            await answer.send(await self._cancel(interaction, job_id))

    async def _cancel(self, interaction: discord.Interaction, job_id: int) -> str:
        job = await self.services.store.get(job_id)
        if job is None:
            return f"There is no job #{job_id}."
        if not self._may_cancel(interaction, job):
            return "Only the person who asked (or a server manager) can cancel this job."
        if await self.services.dispatcher.cancel(job_id):
            return f"Cancelled job #{job_id}. Nothing was charged."
        return f"Job #{job_id} is already {job.state}; too late to cancel."

    @staticmethod
    def _may_cancel(interaction: discord.Interaction, job: Job) -> bool:
        if interaction.user.id == job.user_id:
            return True
        permissions = getattr(interaction, "permissions", None)
        return bool(permissions and permissions.manage_guild and interaction.guild_id == job.guild_id)

    @app_commands.command(name="help", description="How to use stembot")
    async def help(self, interaction: discord.Interaction) -> None:
        # The installed models are read once (off the event loop), the server's policy from
        # the database: either may be slow, so the answer may be deferred.
        async with TimelyAnswer(interaction, ephemeral=True) as answer:
            await answer.send(await self._help_text(interaction))

    async def _help_text(self, interaction: discord.Interaction) -> str:
        settings = self.services.settings
        text = (
            "**stembot** splits songs into stems.\n"
            "• `/split file:` — vocals, drums, bass and other (or pick one with `stems:`)\n"
            "• `/karaoke file:` — vocals and instrumental (also with `tempo:` and `transpose:`)\n"
            "• `/split tempo: transpose:` — the stems at 50-150% speed, or up to 12 semitones up or down\n"
            "• `/mix file: without: drums` — one file of the stems you choose (`stems:` or `without:`), "
            "at your `volumes:` (e.g. `vocals=50 bass=120`), `tempo:` and `transpose:`\n"
            "• Right-click a message with a song → **Apps → Split stems**\n"
            "• `/queue` shows your jobs; `/cancel` or the Cancel button stops one\n"
            "• `/challenge` — remix challenges: stems for everyone, remixes, a vote\n"
            f"Formats: mp3 (default), opus, flac, wav. Tracks from {settings.min_duration_s:g} s to "
            f"{format_duration(settings.max_duration_s)}, files up to {human_size(settings.max_input_bytes)}. "
            "Results too large for this server's upload limit come as smaller files or download links."
        )
        shown = await self._offers(interaction)
        if shown:
            text += "\n**Models here** (a dearer model's minutes count more):\n" + "\n".join(
                f"• `{offer.option}`: `{offer.model.name}` — {', '.join(offer.model.stems)} · {offer.model.speed} · "
                f"minutes count {format_factor(offer.cost_factor)}" for offer in shown)
        return text

    async def _offers(self, interaction: discord.Interaction) -> list[Offer]:
        """The plain-word options this server can use, with the model each runs."""
        services = self.services
        policy = await services.quotas.policy(interaction.guild_id, _role_ids(interaction))
        return offers(await services.installed_models(), services.model_defaults(), policy.allowed_models,
                      policy.default_model)

    @app_commands.command(name="quota", description="Your minutes and jobs left today")
    async def quota(self, interaction: discord.Interaction) -> None:
        async with TimelyAnswer(interaction, ephemeral=True) as answer:
            await answer.send(await self._quota_text(interaction))

    async def _quota_text(self, interaction: discord.Interaction) -> str:
        policy = await self.services.quotas.policy(interaction.guild_id, _role_ids(interaction))
        status = await self.services.quotas.status(interaction.guild_id, interaction.user.id, policy)
        reset = discord.utils.format_dt(status.resets_at, "R")
        lines = [
            f"**You:** {status.user_left_s / 60:.1f} of {policy.user_minutes_per_day:g} min left today"
            + (f" ({status.user_reserved_s / 60:.1f} min held by jobs in progress)" if status.user_reserved_s else ""),
            f"**Jobs:** {status.user_active} of {policy.user_concurrent_jobs} in progress",
        ]
        if self.services.quotas.ceilings is not None:
            lines.append("Your minutes and jobs count what you run in every server and in DMs.")
        if interaction.guild_id:
            lines.append(f"**This server:** {status.guild_left_s / 60:.1f} of {policy.guild_minutes_per_day:g} "
                         f"min left today, {status.guild_active} of {policy.guild_queued_jobs} jobs queued or running")
        lines.append(f"Tracks up to {format_duration(policy.max_track_minutes * 60)}. Allowances reset at 00:00 UTC "
                     f"({reset}).")
        dearer = [offer for offer in await self._offers(interaction) if offer.cost_factor != 1.0]
        if dearer:
            lines.append("A track's minutes count times its model's cost: " + ", ".join(
                f"`{offer.option}` costs {format_factor(offer.cost_factor)} minutes" for offer in dearer) + ".")
        return "\n".join(lines)

    @app_commands.command(name="forget", description="Delete your stored songs and stems now")
    async def forget(self, interaction: discord.Interaction) -> None:
        async with TimelyAnswer(interaction, ephemeral=True) as answer:
            jobs = await self.services.forget_user(interaction.user.id)
            await answer.send(f"Deleted the files of {jobs} finished job{'s' if jobs != 1 else ''}; their download "
                              "links no longer work." if jobs else "You have no stored results.")

    # -- starting a job ----------------------------------------------------------------

    def refusal(self, policy, channel_id: int | None, file: discord.Attachment | None, url: str | None,
                model: str, fmt: str) -> str | None:
        """Why this request cannot be taken, in one sentence, or None."""
        settings = self.services.settings
        if policy.allowed_channels and channel_id not in policy.allowed_channels:
            where = ", ".join(f"<#{c}>" for c in policy.allowed_channels[:5])
            return f"stembot is not enabled in this channel; use it in {where}."
        if url is not None and file is None:
            return self.link_refusal(policy, url)
        if file is None or url is not None:
            return "Attach a song with `file:` or give a link with `url:` (one of the two)."
        if not is_media(file):
            return f"`{file.filename}` isn't an audio or video file. Attach an mp3, wav, flac, ogg, m4a or a video."
        reason = self.attachment_refusal(file)
        if reason is not None:
            return reason
        if file.size > settings.max_input_bytes:
            return (f"`{file.filename}` is {human_size(file.size)}; the limit is "
                    f"{human_size(settings.max_input_bytes)}.")
        if model not in self.services.available_models():
            return f"Unknown model `{model}`. Available: {', '.join(self.services.available_models())}."
        if policy.allowed_models is not None and model not in policy.allowed_models:
            return f"This server allows these models: {', '.join(policy.allowed_models)}."
        if policy.allowed_formats is not None and fmt not in policy.allowed_formats:
            return f"This server allows these formats: {', '.join(policy.allowed_formats)}."
        return None

    def attachment_refusal(self, file: discord.Attachment) -> str | None:
        """Refuse an attachment at once when its URL is not on the Discord CDN origins this bot
        fetches attachments from (the fetch checks it again, on every redirect)."""
        try:
            check_url(file.url, self.services.fetch_rules.attachments)
        except LinkNotAllowedError as exc:
            log.warning("attachment %s refused: %s", file.id, exc.reason)  # not its URL: it is signed
            return f"`{file.filename}` can't be fetched: {exc.reason}."
        return None

    def link_refusal(self, policy, url: str) -> str | None:
        """Refuse a link at once when it can be refused without the network."""
        ceilings = self.services.quotas.ceilings
        if not policy.links_allowed:
            where = "this bot" if ceilings is not None and not ceilings.links_allowed else "this server"
            return f"Links are not allowed on {where}; attach the file instead."
        try:
            check_url(url.strip(), self.services.fetch_rules.links)
        except LinkNotAllowedError as exc:
            return f"That link can't be used: {exc.reason}."
        if ytdl.is_streaming_link(url):
            if not policy.streaming_links_allowed and ceilings is not None and not ceilings.streaming_links_allowed:
                return "YouTube and SoundCloud links are turned off on this bot; attach the file instead."
            if not policy.streaming_links_allowed:
                return ("YouTube and SoundCloud links are not enabled on this server; a server manager can turn "
                        "them on with `/stembot links`.")
            if not ytdl.available():
                return "YouTube and SoundCloud links need yt-dlp, which this bot does not have installed."
        return None

    async def start_job(self, interaction: discord.Interaction, file: discord.Attachment | None, url: str | None,
                        stems: str, fmt: str | None, model: str | None,
                        render: RenderOptions = PLAIN, mix: MixArgs | None = None,
                        words: PlainWords | None = None) -> None:
        # The policy, the quota and the admission read and write the database: when that is
        # slow, the interaction is deferred in time (publicly: it becomes the status message),
        # and a refusal still reaches only the member.
        async with TimelyAnswer(interaction, ephemeral=False) as answer:
            await self._start_job(interaction, answer, file, url, stems, fmt, model, render, mix, words)

    async def _start_job(self, interaction: discord.Interaction, answer: TimelyAnswer,
                         file: discord.Attachment | None, url: str | None, stems: str, fmt: str | None,
                         model: str | None, render: RenderOptions, mix: MixArgs | None,
                         words: PlainWords | None = None) -> None:
        services = self.services
        policy = await services.quotas.policy(interaction.guild_id, _role_ids(interaction))
        fmt = fmt or policy.default_format or "mp3"
        reason = None
        if words is not None and (words.given or stems == DIALOGUE):
            # Plain words: the model follows from what is installed and allowed here.
            try:
                choice = choose(Request(stems, model, words.quality, words.backing_vocals, words.clean),
                                await services.installed_models(), services.model_defaults(),
                                policy.allowed_models, policy.default_model)
            except BadRequestError as exc:
                await answer.send(_sentence(exc.reason), private=True)
                return
            model, stems, cost_factor, clean_model = choice.model, choice.stems, choice.cost_factor, choice.clean_model
        else:
            model = model or policy.default_model or services.settings.model
            cost_factor, clean_model = cost_factor_for(model, services.settings.model_dir), None
        if mix is not None:
            # The model decides which stems there are to mix.
            try:
                stems, render = mix_request(model, mix.stems, mix.without, mix.volumes, mix.tempo, mix.transpose)
            except BadRequestError as exc:
                reason = _sentence(exc.reason)
        reason = reason or self.refusal(policy, interaction.channel_id, file, url, model, fmt)
        if reason is None:
            reason = await quota_refusal(services, interaction, policy)
        job = None
        if reason is None:
            # Taking the slot before answering keeps a refusal private (ephemeral).
            job, reason = await services.dispatcher.submit(
                policy,
                user_id=interaction.user.id, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
                application_id=interaction.application_id, interaction_id=interaction.id,
                interaction_token=interaction.token, token_expires_at=interaction.created_at + TOKEN_LIFETIME,
                attachment_size_limit=interaction.filesize_limit,
                **_source(file, url), model=model, stems=stems, format=fmt, render_options=render.to_column(),
                cost_factor=cost_factor, clean_model=clean_model,
            )
            if reason is not None:
                reason = reason[0].upper() + reason[1:] + "."
        if reason is not None:
            await answer.send(reason, private=True)
            return
        assert job is not None, "the dispatcher refuses with a reason or queues a job"
        try:
            await answer.defer()
            status_message = await interaction.original_response()
        except Exception:
            await services.dispatcher.cancel(job.id)  # nowhere to show it: give the slot back
            raise
        await services.store.update(job.id, status_message_id=status_message.id)
        services.dispatcher.wake()  # it may start now that its status message exists
        log.info("job %s queued: %s for user %s", job.id, job.source_name, interaction.user.id)
        await services.notifier.job_changed(await services.store.get(job.id))


async def quota_refusal(services, interaction: discord.Interaction, policy, *, slots: bool = False) -> str | None:
    """Why the member (or the server) has no minutes left today, or None. With `slots`,
    also when no job slot is free (admission checks that atomically; this is for callers
    that must answer before they queue)."""
    status = await services.quotas.status(interaction.guild_id, interaction.user.id, policy)
    if status.user_left_s <= 0:
        return (f"You have used today's {policy.user_minutes_per_day:g} minutes; they come back "
                f"{discord.utils.format_dt(status.resets_at, 'R')}.")
    if interaction.guild_id and status.guild_left_s <= 0:
        return (f"This server has used today's {policy.guild_minutes_per_day:g} minutes; they come back "
                f"{discord.utils.format_dt(status.resets_at, 'R')}.")
    if slots and status.user_active >= policy.user_concurrent_jobs:
        return f"You already have {policy.user_concurrent_jobs} job(s) in progress; wait for one to finish."
    if slots and interaction.guild_id and status.guild_active >= policy.guild_queued_jobs:
        return (f"This server's queue is full ({policy.guild_queued_jobs} jobs); try again in a few "
                "minutes.")
    return None


@dataclass(frozen=True)
class PlainWords:
    """The model asked for in plain words (`quality:`, `backing_vocals:`, `clean:`)."""

    quality: str | None = None
    backing_vocals: str | None = None
    clean: str | None = None

    @property
    def given(self) -> bool:
        return any((self.quality, self.backing_vocals, self.clean))


@dataclass(frozen=True)
class MixArgs:
    """What `/mix` was given beyond the song, checked once the model is known."""

    stems: str | None
    without: str | None
    volumes: str | None
    tempo: int | None
    transpose: int | None


async def _render_or_refuse(interaction: discord.Interaction, tempo: int | None,
                            transpose: int | None) -> RenderOptions | None:
    """The tempo and transpose asked for, or None once the member was told why not (privately,
    before anything is queued or charged)."""
    try:
        return split_render(tempo, transpose)
    except BadRequestError as exc:
        await interaction.response.send_message(_sentence(exc.reason), ephemeral=True)
        return None


def _sentence(reason: str) -> str:
    return reason[0].upper() + reason[1:] + "."


def _source(file: discord.Attachment | None, url: str | None) -> dict:
    """The job fields that say where the song comes from."""
    if file is not None:
        return {"source_kind": "attachment", "source_url": file.url, "source_name": file.filename,
                "source_size": file.size}
    assert url is not None, "callers check first that a file or a link was given (refusal())"
    url = url.strip()
    name = link_output_name(url)
    path_suffix = PurePosixPath(url.split("?", 1)[0]).suffix.lower()
    if path_suffix in MEDIA_EXTENSIONS and not name.lower().endswith(path_suffix):
        name += path_suffix  # keeps the type visible in messages, and the input's extension
    kind = "stream" if ytdl.is_streaming_link(url) else "url"
    return {"source_kind": kind, "source_url": url, "source_name": name[:200], "source_size": None}


def _role_ids(interaction: discord.Interaction) -> list[int]:
    # The ids as Discord sent them with the member: `Member.roles` drops roles that are
    # not in the guild cache, and role tiers must not depend on what is cached.
    ids = getattr(interaction.user, "_roles", None)
    if ids is not None:
        return [int(i) for i in ids]
    return [role.id for role in getattr(interaction.user, "roles", [])]
