"""`FakeDiscord`: the fake's parts composed behind one object, its lifecycle, and discord.py wired to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import discord
import yarl
from aiohttp import web
from discord.gateway import DiscordWebSocket
from discord.http import Route

from .cdn import Cdn, attachment_url
from .constants import DEFAULT_ATTACHMENT_SIZE_LIMIT
from .gateway import Gateway
from .interactions import InteractionSender
from .recording import RequestLog
from .records import FakeInteraction, FakeMessage
from .rest import RestApi
from .server import Server
from .state import DiscordState

T = TypeVar("T")


class _Forward:
    """A `FakeDiscord` attribute that lives on one of its parts (read and written there)."""

    def __init__(self, part: str, name: str | None = None) -> None:
        self.part = part
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(getattr(instance, self.part), self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        setattr(getattr(instance, self.part), self.name, value)


class FakeDiscord:
    """Discord REST + gateway + CDN on 127.0.0.1 with a free port. Use `async with`.

    The real discord.py client connects to it unmodified once `patch_discord()` points
    discord.py's API base and gateway URL at it. Tests then push interactions through the
    gateway (`send_slash_command`, `send_message_command`, `send_component`) and read back
    what the bot did: every HTTP request is recorded (JSON bodies and the bytes of uploaded
    files), messages get snowflake ids and can be edited, threads can be started in text
    channels (`threads()` lists them; commands can be sent inside one with `channel_id=`),
    and rate limits or server errors can be injected with `fail_next`.

        async with FakeDiscord() as fake, fake.running(MyBot(guild_ready_timeout=0.1)):
            song = fake.add_attachment("song.wav", wav_bytes)
            interaction = await fake.send_slash_command("split", [attachment_option("file", song)])
            [reply] = await fake.wait_for_messages(interaction)

    The fake patches class attributes of discord.py, so only one fake can be wired to
    discord.py at a time within a process.

    Its parts: `state` (the data), `log` (requests and injected failures), `rest` (the
    /api/v10 routes), `gateway` (the websocket), `interaction_sender`, `cdn` and `server`.
    The attributes below are theirs, reachable from here.
    """

    # The data: ids, users, channels, messages, attachments, interactions, commands.
    application_id = _Forward("state")
    bot_user = _Forward("state")
    user = _Forward("state")  # who invokes commands by default
    guild_id = _Forward("state")
    channel_id = _Forward("state")  # the default guild text channel
    users = _Forward("state")
    channels = _Forward("state")
    messages = _Forward("state")  # insertion order is creation order
    attachments = _Forward("state")
    interactions = _Forward("state")
    commands = _Forward("state")
    guild_commands = _Forward("state")
    _dm_channel_by_user = _Forward("state", "dm_channel_by_user")
    snowflake = _Forward("state")
    make_user = _Forward("state")
    add_guild = _Forward("state")
    add_attachment = _Forward("state")
    add_user_message = _Forward("state")
    messages_for = _Forward("state")
    channel_messages = _Forward("state")
    threads = _Forward("state")

    # The request log and injected failures.
    requests = _Forward("log")
    unhandled_requests = _Forward("log")
    requests_matching = _Forward("log")
    fail_next = _Forward("log")
    fail_uploads_for = _Forward("log")
    hold_next = _Forward("log")
    held = _Forward("log")

    # Discord's rules the REST API enforces.
    callback_deadline_s = _Forward("rest")  # an interaction answered later is "Unknown interaction"

    # The gateway.
    heartbeat_interval_ms = _Forward("gateway")
    gateway_frames = _Forward("gateway", "frames")  # every frame the client sent
    gateway_urls = _Forward("gateway", "urls")  # path+query of every websocket the client opened
    identifies = _Forward("gateway")
    resumes = _Forward("gateway")
    session_id = _Forward("gateway")
    wait_for_identify = _Forward("gateway")
    dispatch = _Forward("gateway")
    send_reconnect = _Forward("gateway")

    # Interactions sent to the bot.
    default_attachment_size_limit = _Forward("interaction_sender")
    send_interaction = _Forward("interaction_sender")
    send_slash_command = _Forward("interaction_sender")
    send_message_command = _Forward("interaction_sender")
    send_component = _Forward("interaction_sender")

    # Where the fake listens.
    base_url = _Forward("server")
    api_url = _Forward("server")
    gateway_url = _Forward("server")
    resume_gateway_url = _Forward("server")

    def __init__(
        self,
        *,
        bot_name: str = "stembot",
        heartbeat_interval_ms: int = 41250,
        default_attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
        max_upload_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.max_upload_bytes = max_upload_bytes
        self.server = Server()
        self.log = RequestLog()
        self.state = DiscordState(
            bot_name=bot_name,
            attachment_url=lambda attachment_id, filename: attachment_url(
                self.server.base_url, attachment_id, filename
            ),
        )
        self.cdn = Cdn(self.state, self.log)
        self.gateway = Gateway(
            self.state,
            heartbeat_interval_ms=heartbeat_interval_ms,
            resume_url=lambda: self.server.resume_gateway_url,
            wait_for=self.wait_for,
        )
        self.interaction_sender = InteractionSender(
            self.state, self.gateway.dispatch, default_attachment_size_limit=default_attachment_size_limit
        )
        self.rest = RestApi(
            self.state,
            self.log,
            gateway_url=lambda: self.server.gateway_url,
            default_attachment_size_limit=lambda: self.interaction_sender.default_attachment_size_limit,
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Start listening on 127.0.0.1 on a free port."""
        app = web.Application(client_max_size=self.max_upload_bytes)
        app.router.add_route("*", r"/api/v{version:\d+}/{tail:.*}", self.rest.handle_api)
        app.router.add_get("/gateway", self.gateway.handle)
        app.router.add_get("/resume-gateway", self.gateway.handle)
        app.router.add_get(Cdn.route, self.cdn.handle)
        app.router.add_route("*", "/{tail:.*}", self.rest.handle_unknown)
        await self.server.start(app)

    async def close(self) -> None:
        """Close open websockets and stop the server."""
        self.log.released.set()
        await self.gateway.close()
        await self.server.stop()

    @contextlib.contextmanager
    def patch_discord(self) -> Iterator[FakeDiscord]:
        """Point discord.py's REST base and gateway at this fake; restore on exit."""
        saved_base, saved_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
        Route.BASE = self.api_url
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield self
        finally:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved_base, saved_gateway

    @contextlib.asynccontextmanager
    async def running(
        self, client: discord.Client, *, token: str = "fake-token", ready_timeout: float = 10.0
    ) -> AsyncIterator[discord.Client]:
        """Patch discord.py, start `client`, wait until it is ready; close it on exit.

        Pass `guild_ready_timeout=0.1` (or similar) to the client: READY carries no
        guilds, and discord.py otherwise waits 2 s before it calls itself ready.
        """
        with self.patch_discord():
            task = asyncio.create_task(client.start(token), name="fake-discord-client")
            try:
                ready = asyncio.create_task(self._wait_client_ready(client, ready_timeout))
                done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    ready.cancel()
                    task.result()  # re-raises why the client stopped
                    raise RuntimeError("the client stopped before it became ready")
                ready.result()
                yield client
            finally:
                await client.close()
                await asyncio.wait_for(task, timeout=10.0)

    async def _wait_client_ready(self, client: discord.Client, within: float) -> None:
        async with asyncio.timeout(within):
            # wait_until_ready() refuses to run before login, and login precedes IDENTIFY.
            await self.wait_for_identify(timeout=within)
            await client.wait_until_ready()

    # ------------------------------------------------------------------ waiting

    async def wait_for(
        self,
        predicate: Callable[[], T],
        *,
        timeout: float = 5.0,
        interval: float = 0.01,
        what: str | None = None,
    ) -> T:
        """Poll `predicate` until it returns something truthy; return that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if loop.time() >= deadline:
                recent = [f"{r.method} {r.path} -> {r.status}" for r in self.requests[-10:]]
                raise TimeoutError(f"{what or 'condition'} not met within {timeout}s; last requests: {recent}")
            await asyncio.sleep(interval)

    async def wait_for_messages(
        self,
        interaction: FakeInteraction,
        count: int = 1,
        *,
        timeout: float = 5.0,
    ) -> list[FakeMessage]:
        """Wait until the interaction has `count` messages (original included) that are not loading."""

        def settled() -> list[FakeMessage] | None:
            messages = self.messages_for(interaction)
            if len(messages) >= count and not any(m.is_loading for m in messages[:count]):
                return messages
            return None

        what = f"{count} settled message(s) for interaction {interaction.id}"
        return await self.wait_for(settled, timeout=timeout, what=what)
