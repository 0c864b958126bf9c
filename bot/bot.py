"""The bot: a thin discord.py `Bot` that owns stembot's services and loads the extensions."""

from __future__ import annotations

import asyncio
import logging
import time

import discord
import yarl
from discord.ext import commands

from bot.access import GatedTree
from core.settings import Settings

log = logging.getLogger(__name__)

# stembot never joins voice channels; skip discord.py's warnings about voice libraries.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

EXTENSIONS = ("bot.exts.split", "bot.exts.admin", "bot.exts.challenge")

# What the bot needs in a channel: read it, answer, attach files, embed the preview,
# and use threads (remix challenges).
PERMISSIONS = discord.Permissions(
    view_channel=True, send_messages=True, send_messages_in_threads=True, embed_links=True,
    attach_files=True, read_message_history=True, create_public_threads=True,
)


def point_at_discord(api_url: str | None, gateway_url: str | None) -> None:
    """Talk to another Discord API base and gateway (a REST proxy, or a fake in tests)."""
    if api_url:
        discord.http.Route.BASE = api_url.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


def invite_url(application_id: int) -> str:
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS,
                                   scopes=("bot", "applications.commands"))


class StemBot(commands.Bot):
    """Holds the services (`self.services`) that the extensions use."""

    def __init__(self, settings: Settings, services, **options):
        intents = discord.Intents.none()
        intents.guilds = True  # channel lookups for delivery after the token expires
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, help_command=None,
                         allowed_mentions=discord.AllowedMentions(users=True, roles=False, everyone=False),
                         tree_cls=GatedTree, **options)
        self.settings = settings
        self.services = services
        self.started_at = time.monotonic()
        self.gateway_ready = asyncio.Event()

    async def setup_hook(self) -> None:
        self.tree.error(self.on_app_command_error)
        if self.services is not None:
            await self.services.start(self)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        if self.services is not None and self.application_id is not None:
            print(f"Invite stembot to a server: {invite_url(self.application_id)}", flush=True)

    async def on_app_command_error(self, interaction: discord.Interaction, error: Exception) -> None:
        """A bug must still get the user an answer, never silence or a stack trace."""
        if isinstance(error, discord.app_commands.CheckFailure):
            return  # the check already answered
        log.error("command %s failed", interaction.command.name if interaction.command else "?", exc_info=error)
        text = "Something went wrong on our side; please try again."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            pass

    async def on_ready(self) -> None:
        self.gateway_ready.set()
        log.info("connected to Discord as %s (%s)", self.user, self.user.id if self.user else "?")

    async def on_guild_join(self, guild: discord.Guild) -> None:
        # The bot stays (leaving is not undone by fixing a mistyped id), but refuses every
        # command there (bot.access); the operator sees why in the log.
        allowed = self.settings.allowed_guild_ids
        if allowed is not None and guild.id not in allowed:
            log.warning("added to server %s, which is not in STEMBOT_ALLOWED_GUILDS: its commands are refused",
                        guild.id)

    async def on_resumed(self) -> None:
        self.gateway_ready.set()

    async def on_disconnect(self) -> None:
        self.gateway_ready.clear()

    def dispatch(self, event_name: str, /, *args, **kwargs) -> None:
        # discord.py's reconnect loop can report a failed attempt after close() finished
        # and dropped the event loop (a SIGTERM during a reconnect): nobody listens then.
        if self.is_closed():
            return
        super().dispatch(event_name, *args, **kwargs)

    async def close(self) -> None:
        services, self.services = self.services, None  # stop them once, however often close() runs
        try:
            if services is not None:
                await services.stop()
        finally:
            await super().close()
