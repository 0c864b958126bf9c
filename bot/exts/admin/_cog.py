"""`/stembot`: server settings for admins (Manage Server), queue control for the bot owner."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.timely import TimelyAnswer
from core.db import utcnow
from core.jobs.job import UNFINISHED, Job, JobState
from core.jobs.job_report import age, describe, short
from core.jobs.stats import server_stats
from core.media.audio import OUTPUT_FORMATS, format_duration

log = logging.getLogger(__name__)

LimitName = Literal["user_minutes_per_day", "guild_minutes_per_day", "user_concurrent_jobs", "guild_queued_jobs",
                    "max_track_minutes"]
INTEGER_LIMITS = ("user_concurrent_jobs", "guild_queued_jobs")
# How /stembot settings names each limit.
LIMIT_LABELS = {"user_minutes_per_day": "Minutes per member per day",
                "guild_minutes_per_day": "Minutes per server per day",
                "user_concurrent_jobs": "Jobs at once per member", "guild_queued_jobs": "Jobs queued per server",
                "max_track_minutes": "Longest track"}
# `/stembot jobs`: the states a listing can be narrowed to, and how long it may be.
JobStateName = Literal["queued", "fetching", "decoding", "separating", "encoding", "delivering", "done", "failed",
                       "cancelled"]
JOBS_LISTED_MAX = 50
MESSAGE_LIMIT = 2000
DEFAULT_REASON = "stopped by the bot's owner"
PERIODS = {"day": timedelta(days=1), "week": timedelta(days=7), "month": timedelta(days=30), "all": None}


def _csv(values) -> str:
    return ", ".join(str(v) for v in values)


def _value(name: str, value: float) -> str:
    return format_duration(value * 60) if name == "max_track_minutes" else f"{value:g}"


# /stembot tier's options, by the limit each raises.
TIER_OPTIONS = {"user_minutes_per_day": "minutes_per_day", "user_concurrent_jobs": "concurrent_jobs",
                "max_track_minutes": "max_track_minutes"}


def _above_ceilings(ceilings, values: dict[str, float | None], options: dict[str, str] | None = None) -> list[str]:
    """What in `values` (limits by name) goes above the operator's ceilings, said for an
    admin who gave them as `options` (the command's option names; default: the limits')."""
    if ceilings is None:
        return []
    return [f"`{(options or {}).get(name, name)}` can be at most {_value(name, getattr(ceilings, name))}"
            for name, value in values.items() if value is not None and ceilings.binds(name, value)]


ANSWER = "stembot.answer"  # where interaction_check leaves the interaction's TimelyAnswer (Interaction.extras)
OPERATOR_CEILING = "on this bot (the ceiling its operator set); nothing was changed."


class Admin(commands.Cog):
    stembot = app_commands.Group(
        name="stembot", description="stembot settings for this server",
        default_permissions=discord.Permissions(manage_guild=True),
        allowed_contexts=app_commands.AppCommandContext(guild=True),
    )

    jobs = app_commands.Group(name="jobs", description="(bot owner) Stuck or failed jobs", parent=stembot)

    def __init__(self, bot):
        self.bot = bot
        self.services = bot.services

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        # default_permissions only hides the commands; a server can change who sees them.
        # The owner-only ones check for themselves.
        if interaction.command and (interaction.command.name in ("pause", "resume", "workers")
                                    or interaction.command.qualified_name.startswith("stembot jobs ")):
            return True
        permissions = interaction.permissions
        if interaction.guild_id is None or not permissions.manage_guild:
            await interaction.response.send_message("You need the Manage Server permission for this.",
                                                    ephemeral=True)
            return False
        # Every command here reads or writes the database before it answers: deferred in
        # time when that is slow (see bot.timely); `_reply` gives the answer either way.
        if interaction.type is discord.InteractionType.application_command:  # not an autocomplete
            interaction.extras[ANSWER] = TimelyAnswer(interaction, ephemeral=True).start()
        return True

    async def _reply(self, interaction: discord.Interaction, text: str, **fields) -> None:
        answer = interaction.extras.get(ANSWER)
        if answer is None:
            await interaction.response.send_message(text, ephemeral=True, **fields)
        else:
            await answer.send(text, **fields)

    # -- showing and setting the policy ------------------------------------------------

    @stembot.command(name="settings", description="Show this server's stembot settings")
    async def settings(self, interaction: discord.Interaction) -> None:
        quotas = self.services.quotas
        policy = await quotas.policy(interaction.guild_id)
        row = await quotas.guild_settings(interaction.guild_id)
        tiers = await quotas.tiers(interaction.guild_id)
        ceilings = quotas.ceilings

        def limit_line(name):
            value, stored = getattr(policy, name), getattr(row, name, None)
            line = f"**{LIMIT_LABELS[name]}:** {_value(name, value)}"
            if stored is not None and ceilings is not None and ceilings.binds(name, stored):
                return line + f" *(set here to {_value(name, stored)}; held to the bot's ceiling)*"
            if ceilings is not None and value == getattr(ceilings, name):
                line += " *(the bot's ceiling)*"
            return line + ("" if stored is None else " *(set here)*")

        links = "allowed" if policy.links_allowed else "not allowed"
        streaming = "allowed" if policy.streaming_links_allowed else "not allowed"
        if ceilings is not None and not ceilings.links_allowed:
            links = streaming = "not allowed by the bot's operator"
        elif ceilings is not None and not ceilings.streaming_links_allowed:
            streaming = "not allowed by the bot's operator"
        lines = [
            *(limit_line(name) for name in LIMIT_LABELS),
            f"**Models:** {_csv(policy.allowed_models) if policy.allowed_models else 'all'}"
            f" (default {policy.default_model or self.services.settings.model})",
            f"**Formats:** {_csv(policy.allowed_formats) if policy.allowed_formats else 'all'}"
            f" (default {policy.default_format or 'mp3'})",
            f"**Links:** {links}; YouTube and SoundCloud {streaming}",
            "**Channels:** " + (_csv(f"<#{c}>" for c in policy.allowed_channels) if policy.allowed_channels
                                else "all"),
            "**Remix challenges** started by: members with Manage Server"
            + (f" and <@&{policy.challenge_role_id}>" if policy.challenge_role_id else ""),
        ]
        for tier in tiers:
            parts = [f"{tier.user_minutes_per_day:g} min/day" if tier.user_minutes_per_day is not None else None,
                     f"{tier.user_concurrent_jobs} jobs" if tier.user_concurrent_jobs is not None else None,
                     f"tracks up to {tier.max_track_minutes:g} min" if tier.max_track_minutes is not None else None]
            held = _above_ceilings(ceilings, {"user_minutes_per_day": tier.user_minutes_per_day,
                                              "user_concurrent_jobs": tier.user_concurrent_jobs,
                                              "max_track_minutes": tier.max_track_minutes})
            lines.append(f"**Tier** <@&{tier.role_id}>: " + ", ".join(p for p in parts if p)
                         + (" *(held to the bot's ceilings)*" if held else ""))
        lines.append("A member's minutes and jobs at once count what they run in every server and in DMs. "
                     "Allowances reset at 00:00 UTC.")
        await self._reply(interaction, "\n".join(lines))

    @stembot.command(name="limit", description="Set a limit (leave value empty for the bot's default)")
    @app_commands.describe(name="which limit", value="the new value; empty resets it to the default")
    async def limit(self, interaction: discord.Interaction, name: LimitName, value: float | None = None) -> None:
        if value is not None:
            if value < 0 or (name in INTEGER_LIMITS and (value < 1 or value != int(value))):
                wanted = "whole number ≥ 1" if name in INTEGER_LIMITS else "number ≥ 0"
                await self._reply(interaction, f"`{name}` must be a {wanted}.")
                return
            if name in INTEGER_LIMITS:
                value = int(value)
            above = _above_ceilings(self.services.quotas.ceilings, {name: value})
            if above:
                await self._reply(interaction, f"{above[0]} {OPERATOR_CEILING}")
                return
        await self.services.quotas.set_guild(interaction.guild_id, **{name: value})
        shown = "the default" if value is None else f"{value:g}"
        await self._reply(interaction, f"`{name}` is now {shown}.")

    @stembot.command(name="models", description="Which models members may use ('all' or a comma-separated list)")
    async def models(self, interaction: discord.Interaction, allowed: str) -> None:
        known = self.services.available_models()
        chosen = None if allowed.strip().lower() == "all" else [m.strip() for m in allowed.split(",") if m.strip()]
        unknown = [m for m in chosen or [] if m not in known]
        if unknown or chosen == []:
            await self._reply(interaction, f"Unknown model(s): {_csv(unknown) or '(none given)'}. "
                                           f"Available: {_csv(known)}.")
            return
        await self.services.quotas.set_guild(interaction.guild_id, allowed_models=_csv(chosen) if chosen else None)
        await self._reply(interaction, f"Models allowed: {_csv(chosen) if chosen else 'all'}.")

    @stembot.command(name="formats", description="Which formats members may ask for ('all' or a list)")
    async def formats(self, interaction: discord.Interaction, allowed: str) -> None:
        chosen = None if allowed.strip().lower() == "all" else [f.strip().lower() for f in allowed.split(",")
                                                                   if f.strip()]
        unknown = [f for f in chosen or [] if f not in OUTPUT_FORMATS]
        if unknown or chosen == []:
            await self._reply(interaction, f"Unknown format(s): {_csv(unknown) or '(none given)'}. "
                                           f"Formats: {_csv(OUTPUT_FORMATS)}.")
            return
        await self.services.quotas.set_guild(interaction.guild_id, allowed_formats=_csv(chosen) if chosen else None)
        await self._reply(interaction, f"Formats allowed: {_csv(chosen) if chosen else 'all'}.")

    @stembot.command(name="links", description="Allow or forbid songs given as links")
    @app_commands.describe(allowed="direct links to audio or video files",
                           streaming="YouTube and SoundCloud links (off unless turned on here)")
    async def links(self, interaction: discord.Interaction, allowed: bool, streaming: bool | None = None) -> None:
        ceilings = self.services.quotas.ceilings
        if ceilings is not None and allowed and not ceilings.links_allowed:
            await self._reply(interaction, "The bot's operator has turned links off on this bot; a server can't turn "
                                           "them on. Nothing was changed.")
            return
        if ceilings is not None and streaming and not ceilings.streaming_links_allowed:
            await self._reply(interaction, "The bot's operator has turned YouTube and SoundCloud links off on this "
                                           "bot; a server can't turn them on. Nothing was changed.")
            return
        changes = {"links_allowed": allowed}
        if streaming is not None:
            changes["streaming_links_allowed"] = streaming and allowed
        await self.services.quotas.set_guild(interaction.guild_id, **changes)
        policy = await self.services.quotas.policy(interaction.guild_id)
        await self._reply(interaction, f"Links are now {'allowed' if policy.links_allowed else 'not allowed'}; "
                                       f"YouTube and SoundCloud links are "
                                       f"{'allowed' if policy.streaming_links_allowed else 'not allowed'}.")

    @stembot.command(name="channel", description="Restrict stembot to some channels")
    @app_commands.describe(action="add or remove a channel, or clear the list (all channels)")
    async def channel(self, interaction: discord.Interaction, action: Literal["add", "remove", "clear"],
                      channel: app_commands.AppCommandChannel | None = None) -> None:
        policy = await self.services.quotas.policy(interaction.guild_id)
        current = list(policy.allowed_channels or [])
        if action == "clear":
            current = []
        elif channel is None:
            await self._reply(interaction, "Name the channel to add or remove.")
            return
        elif action == "add" and channel.id not in current:
            current.append(channel.id)
        elif action == "remove" and channel.id in current:
            current.remove(channel.id)
        await self.services.quotas.set_guild(interaction.guild_id, allowed_channels=_csv(current) if current else None)
        await self._reply(interaction, "stembot works in: " + (_csv(f"<#{c}>" for c in current) if current
                                                               else "every channel") + ".")

    @stembot.command(name="defaults", description="This server's default model and format")
    async def defaults(self, interaction: discord.Interaction, model: str | None = None,
                       format: Literal["mp3", "opus", "flac", "wav"] | None = None) -> None:
        if model is not None and model not in self.services.available_models():
            available = _csv(self.services.available_models())
            await self._reply(interaction, f"Unknown model `{model}`. Available: {available}.")
            return
        changes = {}
        if model is not None:
            changes["default_model"] = model
        if format is not None:
            changes["default_format"] = format
        if not changes:
            await self._reply(interaction, "Give a model, a format, or both.")
            return
        await self.services.quotas.set_guild(interaction.guild_id, **changes)
        await self._reply(interaction, "Defaults set: " + ", ".join(f"{k.removeprefix('default_')} {v}"
                                                                     for k, v in changes.items()) + ".")

    @stembot.command(name="tier", description="Give members with a role a larger allowance")
    async def tier(self, interaction: discord.Interaction, role: discord.Role,
                   minutes_per_day: float | None = None, concurrent_jobs: int | None = None,
                   max_track_minutes: float | None = None) -> None:
        if minutes_per_day is None and concurrent_jobs is None and max_track_minutes is None:
            await self._reply(interaction, "Give at least one of minutes_per_day, concurrent_jobs, max_track_minutes.")
            return
        if any(v is not None and v < 0 for v in (minutes_per_day, concurrent_jobs, max_track_minutes)):
            await self._reply(interaction, "Allowances cannot be negative.")
            return
        above = _above_ceilings(self.services.quotas.ceilings, {
            "user_minutes_per_day": minutes_per_day, "user_concurrent_jobs": concurrent_jobs,
            "max_track_minutes": max_track_minutes}, TIER_OPTIONS)
        if above:
            await self._reply(interaction, "; ".join(above) + f" {OPERATOR_CEILING}")
            return
        await self.services.quotas.set_tier(interaction.guild_id, role.id, user_minutes_per_day=minutes_per_day,
                                            user_concurrent_jobs=concurrent_jobs, max_track_minutes=max_track_minutes)
        await self._reply(interaction, f"Tier set for <@&{role.id}>.")

    @stembot.command(name="tier-remove", description="Remove a role's tier")
    async def tier_remove(self, interaction: discord.Interaction, role: discord.Role) -> None:
        removed = await self.services.quotas.remove_tier(interaction.guild_id, role.id)
        await self._reply(interaction, f"Tier for <@&{role.id}> removed." if removed else f"<@&{role.id}> has no tier.")

    @stembot.command(name="challenges", description="Who may start remix challenges (/challenge start)")
    @app_commands.describe(role="members with this role may start them too; leave empty for Manage Server only")
    async def challenges(self, interaction: discord.Interaction, role: discord.Role | None = None) -> None:
        await self.services.quotas.set_guild(interaction.guild_id, challenge_role_id=role.id if role else None)
        also = f" and members with <@&{role.id}>" if role else " only"
        await self._reply(interaction, f"Remix challenges can be started by members with Manage Server{also}.")

    # -- statistics ----------------------------------------------------------------------

    @stembot.command(name="stats", description="Jobs, minutes and failures in this server")
    async def stats(self, interaction: discord.Interaction,
                    period: Literal["day", "week", "month", "all"] = "week") -> None:
        span = PERIODS[period]
        assert interaction.guild_id is not None, "interaction_check runs server settings commands only in a server"
        stats = await server_stats(self.services.store.sessions, interaction.guild_id,
                                   utcnow() - span if span else None)
        states = ", ".join(f"{state} {count}" for state, count in sorted(stats.by_state.items())) or "none"
        lines = [f"**Last {period}:**" if span else "**All time:**",
                 f"Jobs: {stats.total} ({states}); {stats.cache_hits} answered from the cache",
                 f"Audio separated: {stats.audio_minutes:.1f} min in {stats.separation_minutes:.1f} min of work"]
        if stats.failures:
            lines.append("Failures: " + "; ".join(f"{kind} ×{count} (e.g. “{reason[:80]}”)"
                                                  for kind, count, reason in stats.failures[:5]))
        if stats.busiest:
            lines.append("Busiest: " + ", ".join(f"<@{user}> {minutes:.1f} min ({count} jobs)"
                                                 for user, count, minutes in stats.busiest))
        await self._reply(interaction, "\n".join(lines), allowed_mentions=discord.AllowedMentions.none())

    # -- the bot owner's controls ------------------------------------------------------

    async def _owner(self, interaction: discord.Interaction) -> bool:
        if await self.bot.is_owner(interaction.user):
            return True
        await self._reply(interaction, "Only the bot's owner can do this.")
        return False

    @stembot.command(name="pause", description="(bot owner) Stop starting new jobs")
    async def pause(self, interaction: discord.Interaction) -> None:
        if await self._owner(interaction):
            self.services.dispatcher.paused = True
            await self._reply(interaction, "Paused: jobs are accepted and queued, none are started.")

    @stembot.command(name="resume", description="(bot owner) Start jobs again")
    async def resume(self, interaction: discord.Interaction) -> None:
        if await self._owner(interaction):
            self.services.dispatcher.paused = False
            self.services.dispatcher.wake()
            await self._reply(interaction, "Resumed.")

    @stembot.command(name="workers", description="(bot owner) Workers and their health")
    async def workers(self, interaction: discord.Interaction) -> None:
        if not await self._owner(interaction):
            return
        queue = await self.services.store.queue_length()
        if self.services.distributed:
            slots = await self.services.fleet.slots(include_stale=True)
            lines = [_slot_line(slot, self.services.fleet.stale_s) for slot in slots] or [
                "No worker has connected yet: start `stembot worker` on a GPU host."]
            await self._reply(interaction, "\n".join(lines) + (
                f"\nQueue: {queue} waiting{' (paused)' if self.services.dispatcher.paused else ''}."))
            return
        worker = self.services.worker
        info = worker.info
        state = "ready" if worker.ready and worker.alive() else "not ready"
        current = _occupancy(sorted(worker.current_jobs), worker.capacity)
        await self._reply(interaction, (
            f"**local** (pid {worker.pid}): {state}, {current}; model {info.get('model', '?')} on "
            f"{info.get('device', '?')}, started in {info.get('start_s', 0):.1f} s.\n"
            f"Queue: {queue} waiting{' (paused)' if self.services.dispatcher.paused else ''}."))


    # -- the bot owner's job tools (as `stembot jobs` on the host) -------------------------

    async def _owned_job(self, interaction: discord.Interaction, job_id: int) -> Job | None:
        """The job a bot owner's command names; None once the caller was answered (not the
        owner, or no such job)."""
        if not await self._owner(interaction):
            return None
        found = await self.services.store.get(job_id)
        if found is None:
            await self._reply(interaction, f"There is no job #{job_id}.")
        return found

    @jobs.command(name="list", description="(bot owner) The newest jobs, one line each")
    @app_commands.describe(state="only jobs in this state", limit="at most this many (default 20)")
    async def jobs_list(self, interaction: discord.Interaction, state: JobStateName | None = None,
                        limit: app_commands.Range[int, 1, JOBS_LISTED_MAX] = 20) -> None:
        if not await self._owner(interaction):
            return
        chosen = JobState(state) if state else None
        found = await self.services.store.latest(chosen, limit)
        now = utcnow()
        lines = [f"#{job.id} {job.state} {age(job.created_at, now)} ago · <@{job.user_id}> · "
                 f"{'server ' + str(job.guild_id) if job.guild_id else 'DM'} · {short(job.model, 14)} · "
                 f"{job.attempts} attempt{'s' if job.attempts != 1 else ''}"
                 + (f" · {short(job.error, 60)}" if job.error else "") for job in found]
        if not lines:
            lines = ["No jobs" + (f" in state {state}." if state else ".")]
        await self._reply(interaction, _fit("\n".join(lines)), allowed_mentions=discord.AllowedMentions.none())

    @jobs.command(name="show", description="(bot owner) One job's fields and timeline")
    @app_commands.describe(job="the job number")
    async def jobs_show(self, interaction: discord.Interaction, job: int) -> None:
        found = await self._owned_job(interaction, job)
        if found is None:
            return
        width = max(len(name) for name, _ in describe(found)) + 1
        text = "\n".join(f"{name + ':':{width}} {value}" for name, value in describe(found))
        await self._reply(interaction, _fit(text, code=True))

    @jobs.command(name="retry", description="(bot owner) Put a failed job back in the queue")
    @app_commands.describe(job="the job number")
    async def jobs_retry(self, interaction: discord.Interaction, job: int) -> None:
        found = await self._owned_job(interaction, job)
        if found is None:
            return
        if found.job_state is not JobState.failed:
            # A running job's run may still be under way here or on a worker: the host's
            # `stembot jobs retry` (or a restart, in embedded mode) deals with that.
            await self._reply(interaction, f"Job #{job} is {found.state}: only a failed job can be retried from "
                              "Discord. For a job stuck running, use `stembot jobs retry` on the bot's host.")
            return
        if await self.services.store.retry(job) is None:
            await self._reply(interaction, f"Job #{job} changed meanwhile; look again with `/stembot jobs show`.")
            return
        self.services.dispatcher.wake()
        log.info("job %s retried by the bot's owner %s", job, interaction.user.id)
        await self._reply(interaction, f"Job #{job}: failed → queued (attempts so far: {found.attempts}).")

    @jobs.command(name="fail", description="(bot owner) End an unfinished job as failed, releasing its quota")
    @app_commands.describe(job="the job number", reason=f'what its user is told (default "{DEFAULT_REASON}")')
    async def jobs_fail(self, interaction: discord.Interaction, job: int,
                        reason: app_commands.Range[str, 1, 200] = DEFAULT_REASON) -> None:
        reason = " ".join(reason.split()) or DEFAULT_REASON
        found = await self._owned_job(interaction, job)
        if found is None:
            return
        if found.job_state not in UNFINISHED:
            await self._reply(interaction,
                              f"Job #{job} is {found.state} already: only an unfinished job can be failed.")
            return
        if not await self.services.dispatcher.fail_by_operator(job, reason):
            await self._reply(interaction, f"Job #{job} changed meanwhile; look again with `/stembot jobs show`.")
            return
        log.info("job %s failed by the bot's owner %s", job, interaction.user.id)
        await self._reply(interaction, f"Job #{job}: {found.state} → failed ({reason}); slot and minutes released, "
                          "files deleted, its user told.")



def _fit(text: str, *, code: bool = False) -> str:
    """`text` within Discord's 2,000 characters a message (in a code block with `code`)."""
    room = MESSAGE_LIMIT - (8 if code else 0)
    if len(text) > room:
        text = text[:room - 1] + "…"
    return f"```\n{text}\n```" if code else text


def _slot_line(slot, stale_s: float) -> str:
    state = slot.state if slot.seen_s_ago <= stale_s else f"silent for {slot.seen_s_ago:.0f} s"
    job = _occupancy([slot.job_id] if slot.job_id else [], slot.capacity)
    return f"**{slot.name}** on {slot.host}: {state}, {job}; model {slot.model}"


def _occupancy(jobs: list[int], capacity: int) -> str:
    text = ", ".join(f"job #{job}" for job in jobs) if jobs else "idle"
    return text + (f" (takes {capacity} at once)" if capacity > 1 else "")
