"""The Discord side of a job: its status message, the result, and how it ended.

While the interaction token is valid (15 minutes) everything goes through it: the
status message is edited in place and becomes the result. After that (a long queue, a
restart) the result is posted in the channel mentioning the user, or sent by DM when
the channel is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

import aiohttp
import discord

from core.db import as_utc, utcnow
from core.errors import input_error_kinds
from core.jobs.job import UNANSWERED, Job, JobState
from core.jobs.recent import RecentKeys
from core.jobs.results import CheckedResults, job_render, open_checked, shown_error
from core.media.analysis import TrackAnalysis
from core.media.audio import OutputFormat, format_duration
from core.media.upload_plan import describe_format, links_note, too_large_error

from ._status import StatusBoard, StatusView, render_status
from ._views import cancel_view, link_view

log = logging.getLogger(__name__)

PAYLOAD_TOO_LARGE = 40005
# What Discord answers an edit through the interaction token when the status message was
# deleted (10008 Unknown Message), the interaction is gone (10015 Unknown Webhook) or the
# token expired (401, 50027 Invalid Webhook Token): the answer must go another way.
UNKNOWN_MESSAGE = 10008
UNKNOWN_WEBHOOK = 10015
INVALID_WEBHOOK_TOKEN = 50027
# Discord takes the first answer to an interaction within 3 s; 2 s more for clocks.
INTERACTION_ANSWER_WINDOW = timedelta(seconds=5)
# Unfinished jobs the notifier remembers a fact about, at most (see DiscordNotifier.__init__).
JOBS_KEPT = 10_000


class DiscordNotifier:
    """Implements core.jobs.dispatcher.Notifier for Discord."""

    def __init__(self, bot, services):
        self.bot = bot
        self.services = services
        self.board = StatusBoard(self._edit_status, self._render)
        # Per unfinished job; each is forgotten when its job ends (see `_forget`), and the
        # sets are bounded anyway: the bot runs for months.
        self._stage_started: dict[int, tuple[str, float]] = {}
        self._reply_gone: RecentKeys[int] = RecentKeys(JOBS_KEPT)  # status message can no longer be edited
        self._reply_sought: RecentKeys[int] = RecentKeys(JOBS_KEPT)  # lost status message id was looked for

    def _forget(self, job_id: int) -> None:
        self._stage_started.pop(job_id, None)
        self._reply_gone.discard(job_id)
        self._reply_sought.discard(job_id)

    def tracked_jobs(self) -> int:
        """How many jobs the notifier holds anything for (bounded: for tests and metrics)."""
        return len(self._stage_started) + len(self._reply_gone) + len(self._reply_sought) + self.board.tracked_jobs()

    @staticmethod
    def transient(exc: BaseException) -> bool:
        """Whether a failed delivery may go through later: Discord answering 5xx, or still
        rate limiting after discord.py's own waits, or the connection refused, reset or
        timed out. Any other 4xx means the request itself is wrong."""
        if isinstance(exc, discord.HTTPException):
            return exc.status >= 500 or exc.status == 429
        return isinstance(exc, aiohttp.ClientConnectionError | ConnectionError | TimeoutError)

    # -- progress ----------------------------------------------------------------------

    async def job_changed(self, job: Job) -> None:
        if job.is_final:
            return  # a late update: its end is (being) told by deliver or job_ended
        if job.status_message_id is None and job.interaction_token is not None:
            found = await self._find_reply(job)
            if found is None:
                return
            job = found
        stage = self._stage_started.get(job.id)
        if stage is None or stage[0] != job.state:
            self._stage_started[job.id] = (job.state, time.monotonic())
        if job.job_state is JobState.queued and not job.token_usable():
            return  # its message can no longer be edited: no place to compute for it
        self.board.update(job)

    async def _render(self, job: Job) -> str:
        view = StatusView(worker_ready=self.services.worker_ready)
        if job.job_state is JobState.queued:
            snapshot = await self.services.store.queue_snapshot(job.id)
            view = StatusView(snapshot.position, snapshot.length, worker_ready=self.services.worker_ready)
        elif job.id in self._stage_started:
            view = StatusView(stage_elapsed_s=time.monotonic() - self._stage_started[job.id][1],
                              worker_ready=self.services.worker_ready)
        return render_status(job, view)

    async def _edit_status(self, job: Job, text: str) -> None:
        await self._edit_reply(job, content=text, view=cancel_view(job.id))

    async def _find_reply(self, job: Job) -> Job | None:
        """A job admitted whose status message id was never saved cannot start and would
        leave its user "thinking...". If the bot was killed between deferring the interaction
        and saving the id, find that reply through the token, save it, and let the job
        start. If it was killed before deferring, the interaction was never answered and
        never can be: cancel the job (nothing charged) and tell its user, in the channel or
        by DM, to send it again. Looked for once per job."""
        token = job.interaction_token
        if token is None or job.id in self._reply_sought:
            return None
        self._reply_sought.add(job.id)
        message, never = await self._original_reply(job, token) if job.token_usable() else (None, True)
        if message is None:
            if never and job.job_state is JobState.queued:
                await self.services.dispatcher.cancel_unanswered(job.id)
            return None
        if not await self.services.store.update(job.id, status_message_id=message.id):
            return None
        log.info("job %s: attached to its reply %s after a restart", job.id, message.id)
        self.services.dispatcher.wake()
        return await self.services.store.get(job.id)

    async def _original_reply(self, job: Job, token: str) -> tuple[discord.Message | None, bool]:
        """The interaction's reply; else None, and whether there never will be one (Discord
        knows no reply and the time to answer the interaction is over)."""
        while True:
            try:
                # The interaction's reply is the webhook message "@original".
                return await self._webhook(job, token).fetch_message("@original"), False  # type: ignore[arg-type]
            except discord.HTTPException as exc:
                log.info("job %s: no reply to attach it to (%s %s)", job.id, exc.status, exc.code)
                if not (isinstance(exc, discord.NotFound) and exc.code in (UNKNOWN_WEBHOOK, UNKNOWN_MESSAGE)):
                    return None, False  # Discord is unwell: the sweeper settles it if it lasts
            wait = (_answer_deadline(job) - utcnow()).total_seconds()
            if wait <= 0:
                return None, True
            await asyncio.sleep(wait)  # the bot that admitted it may be deferring right now

    def _webhook(self, job: Job, token: str) -> discord.Webhook:
        """The interaction's webhook. An application webhook, as discord.py builds
        `Interaction.followup` from the same id and token: only such a webhook may send
        ephemeral follow-ups."""
        return discord.Webhook.from_state(
            data={"id": job.application_id or self.bot.application_id, "type": 3, "token": token},
            state=self.bot._connection)

    async def _edit_reply(self, job: Job, **fields) -> bool:
        """Edit the job's status message through the interaction token, if still valid.
        False when it cannot be: no token, expired, or the message deleted (by the user or
        a moderator), so that the caller answers in the channel or by DM instead."""
        token = job.interaction_token
        if token is None or not job.token_usable() or job.status_message_id is None or job.id in self._reply_gone:
            return False
        try:
            await self._webhook(job, token).edit_message(job.status_message_id, **fields)
        except discord.HTTPException as exc:
            if not _reply_unusable(exc):
                raise
            log.info("job %s: its status message can no longer be edited (%s %s); answering elsewhere",
                     job.id, exc.status, exc.code)
            self._reply_gone.add(job.id)
            for file in fields.get("attachments") or []:
                file.reset()  # the failed request may have read them
            return False
        return True

    # -- results -----------------------------------------------------------------------

    async def deliver(self, job: Job) -> None:
        await self.board.close(job.id)
        self._stage_started.pop(job.id, None)
        # Only checked files go out, under names the bot makes (see core.jobs.results);
        # a failed check raises ResultsRefused, which fails the job.
        try:
            async with open_checked(self.services.storage, job) as (stems_dir, results):
                await self._deliver_from(job, stems_dir, results)
        finally:
            self._forget(job.id)

    async def _deliver_from(self, job: Job, stems_dir, results: CheckedResults) -> None:
        files = results.files
        header = self._result_header(job, results.format, len(files), results.analysis)
        note = results.note
        player_url = self.services.player_link(job.id)
        if results.mode == "attach":
            try:
                await self._send_result(job, content=_join(header, note),
                                        files=self._files(stems_dir, files, results.preview),
                                        view=link_view({}, player_url))
                return
            except discord.HTTPException as exc:
                if exc.status != 413 and exc.code != PAYLOAD_TOO_LARGE:
                    raise
                if not self.services.links_available:
                    raise too_large_error(results.format, job.attachment_size_limit) from exc
                note = links_note(job.attachment_size_limit, self.services.link_ttl_s / 3600)
        links = await self.services.stem_links(job.id, list(files.values()))
        preview = self._files(stems_dir, {}, results.preview)
        await self._send_result(job, content=_join(header, note), files=preview, view=link_view(links, player_url))

    @staticmethod
    def _result_header(job: Job, fmt: OutputFormat, count: int, analysis: TrackAnalysis | None = None) -> str:
        render = job_render(job)  # read already by the results' check
        if render.mix is not None:
            parts = [f"a mix of {render.describe_mix()}"]
        else:
            parts = [f"{count} stem{'s' if count != 1 else ''}"]
        if render.describe():
            parts.append(render.describe())  # "at 80% speed, +2 semitones"
        parts.append(describe_format(fmt))
        if job.duration_s:
            parts.append(f"{format_duration(job.duration_s)} of audio")
        if analysis is not None:
            # Checked: a number and one of 24 key names. Stems at another tempo or key have
            # that tempo and key, not the song's.
            heard = analysis.rendered(render.tempo, render.transpose).describe()
            if heard:
                parts.append(heard)
        if job.cache_hit:
            parts.append("from the cache")
        elif job.separation_s:
            parts.append(f"separated in {job.separation_s:.0f} s")
        return f"✅ **Done:** `{job.source_name}` — " + " · ".join(parts)

    @staticmethod
    def _files(stems_dir, files: dict[str, str], preview: str | None) -> list[discord.File]:
        out = [discord.File(stems_dir / file, filename=file) for file in files.values()]
        if preview and len(out) < 10 and (stems_dir / preview).exists():
            out.append(discord.File(stems_dir / preview, filename=preview, description="waveforms of the stems"))
        return out

    async def _send_result(self, job: Job, *, content: str, files: list[discord.File],
                           view: discord.ui.View | None = None) -> None:
        """Replace the status message with the result, or post it in the channel or DM.
        Only the job's user may be pinged, whatever the text says."""
        nobody = discord.AllowedMentions.none()
        if await self._edit_reply(job, content=content, attachments=files, view=view, allowed_mentions=nobody):
            return
        mention = f"<@{job.user_id}> "
        target = await self._channel(job)
        if target is not None:
            try:
                await target.send(content=mention + content, files=files, view=view or discord.utils.MISSING,
                                  allowed_mentions=discord.AllowedMentions(
                                      everyone=False, roles=False, users=[discord.Object(job.user_id)]))
                return
            except (discord.NotFound, discord.Forbidden):
                log.info("job %s: channel %s unusable, sending by DM", job.id, job.channel_id)
            for file in files:
                file.reset()
        user = self.bot.get_user(job.user_id) or await self.bot.fetch_user(job.user_id)
        await user.send(content=content, files=files, view=view or discord.utils.MISSING, allowed_mentions=nobody)

    async def _channel(self, job: Job):
        if job.channel_id is None:
            return None
        channel = self.bot.get_channel(job.channel_id)
        if channel is not None:
            return channel
        try:
            return await self.bot.fetch_channel(job.channel_id)
        except (discord.NotFound, discord.Forbidden):
            return None

    # -- endings -----------------------------------------------------------------------

    async def job_ended(self, job: Job) -> None:
        await self.board.close(job.id)
        self._stage_started.pop(job.id, None)
        if job.job_state is JobState.cancelled and job.error_kind == UNANSWERED:
            try:
                # It has no reply to edit: the channel (mentioning only them), else a DM.
                await self._send_result(job, content=f"⚠️ Your request to split `{job.source_name}` was lost: the "
                                        "bot restarted before it could answer. Nothing was charged; please send it "
                                        "again.", files=[])
            finally:
                self._forget(job.id)
            return
        if job.job_state is JobState.cancelled:
            content = f"✖️ **Cancelled:** `{job.source_name}`. Nothing was charged."
        else:
            content = f"❌ **Couldn't split** `{job.source_name}`: {shown_error(job)}"
        try:
            if job.job_state is JobState.failed and job.error_kind in input_error_kinds():
                await self._tell_privately(job, content + " Nothing was charged.")
                return
            if await self._edit_reply(job, content=content, view=None):
                return
            if job.job_state is JobState.failed:
                # The status message is gone or out of reach: the failure goes to the
                # channel (mentioning only the user), else by DM, like a result.
                await self._send_result(job, content=content, files=[])
        finally:
            self._forget(job.id)

    async def _tell_privately(self, job: Job, content: str) -> None:
        """A refused file or link is the member's business: the public "thinking" message
        goes away and only they see why (an ephemeral follow-up, or a DM once the
        interaction token has expired; the channel, mentioning them, when DMs are closed)."""
        token = job.interaction_token
        if token is not None and job.token_usable():
            webhook = self._webhook(job, token)
            if job.status_message_id is not None:
                try:
                    await webhook.delete_message(job.status_message_id)
                except discord.NotFound:
                    pass
            await webhook.send(content, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
            return
        try:
            user = self.bot.get_user(job.user_id) or await self.bot.fetch_user(job.user_id)
            await user.send(content=content, allowed_mentions=discord.AllowedMentions.none())
        except (discord.Forbidden, discord.NotFound):
            await self._send_result(job, content=content, files=[])


def _answer_deadline(job: Job) -> datetime:
    """When Discord stops taking the first answer to the job's interaction (plus a margin
    for clocks): made from the interaction's id, a snowflake, else from the job's row."""
    if job.interaction_id is not None:
        asked = discord.utils.snowflake_time(job.interaction_id)
    else:
        asked = as_utc(job.created_at)
    return asked + INTERACTION_ANSWER_WINDOW


def _reply_unusable(exc: discord.HTTPException) -> bool:
    """Whether a failed edit of the status message means it can never succeed."""
    if isinstance(exc, discord.NotFound):
        return exc.code in (UNKNOWN_MESSAGE, UNKNOWN_WEBHOOK)
    return exc.status == 401 and exc.code == INVALID_WEBHOOK_TOKEN


def _join(*parts: str) -> str:
    return "\n".join(p for p in parts if p)
