"""A fake Discord (REST API, gateway websocket and attachment CDN) on loopback.

The real discord.py client connects to it unmodified once `FakeDiscord.patch_discord()`
points discord.py's API base and gateway URL at it. Tests then push interactions
through the gateway (`send_slash_command`, `send_message_command`, `send_component`)
and read back what the bot did: every HTTP request is recorded (JSON bodies and the
bytes of uploaded files), messages get snowflake ids and can be edited, threads can
be started in text channels (`threads()` lists them; commands can be sent inside one
with `channel_id=`), and rate limits or server errors can be injected with `fail_next`.

    async with FakeDiscord() as fake, fake.running(MyBot(guild_ready_timeout=0.1)):
        song = fake.add_attachment("song.wav", wav_bytes)
        interaction = await fake.send_slash_command("split", [attachment_option("file", song)])
        [reply] = await fake.wait_for_messages(interaction)

The fake patches class attributes of discord.py, so only one fake can be wired to
discord.py at a time within a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import mimetypes
import re
import secrets
import socket
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import discord
import yarl
from aiohttp import WSMsgType, web
from discord.gateway import DiscordWebSocket
from discord.http import Route

__all__ = [
    "CALLBACK_CHANNEL_MESSAGE",
    "CALLBACK_DEFERRED_CHANNEL_MESSAGE",
    "CALLBACK_DEFERRED_UPDATE_MESSAGE",
    "CALLBACK_UPDATE_MESSAGE",
    "FakeAttachment",
    "FakeDiscord",
    "FakeInteraction",
    "FakeMessage",
    "RecordedRequest",
    "UploadedFile",
    "attachment_option",
    "boolean_option",
    "integer_option",
    "string_option",
    "subcommand_option",
]

T = TypeVar("T")

DISCORD_EPOCH_MS = 1420070400000
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

# Interaction types (Discord API).
INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_MESSAGE_COMPONENT = 3

# Interaction callback types.
CALLBACK_CHANNEL_MESSAGE = 4
CALLBACK_DEFERRED_CHANNEL_MESSAGE = 5
CALLBACK_DEFERRED_UPDATE_MESSAGE = 6
CALLBACK_UPDATE_MESSAGE = 7

# Message flags.
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

# What a bot typically holds in a text channel: view, send, embed, attach, read
# history, use application commands, send in threads.
DEFAULT_APP_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31) | (1 << 38)


# --------------------------------------------------------------------------- records


@dataclass
class UploadedFile:
    """One file part of a multipart request (`files[n]`)."""

    field: str
    filename: str
    content_type: str | None
    data: bytes


@dataclass
class RecordedRequest:
    """One HTTP request the client made, as the fake saw and answered it."""

    method: str
    path: str  # below the API base, e.g. "/channels/1/messages"; CDN paths start with "/cdn/"
    query: dict[str, str]
    headers: dict[str, str]
    json: Any  # the JSON body, or the `payload_json` part of a multipart body
    files: list[UploadedFile]
    time: float  # time.monotonic() on arrival
    route: str | None = None  # name of the fake's route that answered; None when nothing matched
    status: int | None = None  # the status the fake answered with
    response: Any = None  # the JSON the fake answered with


@dataclass
class FakeAttachment:
    """A file the fake stores and serves from its CDN."""

    id: int
    filename: str
    data: bytes
    content_type: str | None
    url: str
    description: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
        }
        if self.content_type:
            payload["content_type"] = self.content_type
        if self.description is not None:
            payload["description"] = self.description
        return payload


@dataclass
class FakeMessage:
    """A message in the fake's store; edits update it in place."""

    id: int
    channel_id: int
    author: dict[str, Any]
    timestamp: str
    guild_id: int | None = None
    type: int = 0
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[FakeAttachment] = field(default_factory=list)
    flags: int = 0
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None  # the interaction whose response or followup this is
    extra: dict[str, Any] = field(default_factory=dict)  # other keys the bot sent (tts, poll, ...)
    edited_timestamp: str | None = None
    edits: list[dict[str, Any]] = field(default_factory=list)  # raw edit payloads, oldest first
    deleted: bool = False

    @property
    def is_loading(self) -> bool:
        """True while this is a deferred ("thinking") response nobody has edited yet."""
        return bool(self.flags & FLAG_LOADING)

    @property
    def is_ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    def attachment_named(self, filename: str) -> FakeAttachment:
        for attachment in self.attachments:
            if attachment.filename == filename:
                return attachment
        names = [a.filename for a in self.attachments]
        raise KeyError(f"message {self.id} has no attachment {filename!r}; it has {names}")

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            **self.extra,
            "id": str(self.id),
            "channel_id": str(self.channel_id),
            "type": self.type,
            "content": self.content,
            "author": self.author,
            "attachments": [a.to_payload() for a in self.attachments],
            "embeds": self.embeds,
            "components": self.components,
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": bool(self.extra.get("tts", False)),
            "timestamp": self.timestamp,
            "edited_timestamp": self.edited_timestamp,
            "flags": self.flags,
        }
        if self.guild_id is not None:
            payload["guild_id"] = str(self.guild_id)
        if self.webhook_id is not None:
            payload["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            payload["application_id"] = str(self.application_id)
        return payload


@dataclass
class FakeInteraction:
    """An interaction the fake sent, and how the bot answered it."""

    id: int
    token: str
    type: int
    payload: dict[str, Any]  # the INTERACTION_CREATE data as sent
    channel_id: int
    guild_id: int | None
    user: dict[str, Any]
    message_id: int | None = None  # for components: the message holding the component
    callback_type: int | None = None
    callback_data: dict[str, Any] | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return self.callback_type is not None


@dataclass
class _InjectedFailure:
    method: str
    pattern: re.Pattern[str]
    status: int
    retry_after: float
    is_global: bool
    remaining: int


class _ApiError(Exception):
    """Raised by route handlers to answer with a Discord-shaped JSON error."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_NO_CONTENT = object()  # handler result meaning "answer 204"


# --------------------------------------------------------------------------- option builders


def string_option(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "type": 3, "value": value}


def integer_option(name: str, value: int) -> dict[str, Any]:
    return {"name": name, "type": 4, "value": value}


def boolean_option(name: str, value: bool) -> dict[str, Any]:
    return {"name": name, "type": 5, "value": value}


def attachment_option(name: str, attachment: dict[str, Any] | FakeAttachment) -> dict[str, Any]:
    """An attachment option; the fake fills `resolved.attachments` from its store by id."""
    attachment_id = attachment.id if isinstance(attachment, FakeAttachment) else attachment["id"]
    return {"name": name, "type": 11, "value": str(attachment_id)}


def subcommand_option(name: str, options: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"name": name, "type": 1, "options": list(options)}


# --------------------------------------------------------------------------- helpers


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py only parses JSON when Content-Type is exactly "application/json";
    # web.json_response appends "; charset=utf-8", which makes it see plain text.
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return web.Response(status=status, body=json.dumps(body).encode(), headers=all_headers)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _is_truthy_query(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true")


_FILE_FIELD = re.compile(r"files?\[?(\d+)\]?")


class _GatewayConnection:
    """One websocket the client opened; sends JSON text, zlib-compressed when asked."""

    def __init__(self, ws: web.WebSocketResponse, url: str, compression: str | None) -> None:
        self.ws = ws
        self.url = url
        self.compression = compression
        # discord.py asks for compress=zlib-stream (or zstd-stream when a zstd module is
        # importable). With zlib it expects one shared stream, each message ending in a
        # Z_SYNC_FLUSH marker; text frames are always accepted uncompressed.
        self._zlib = zlib.compressobj() if compression == "zlib-stream" else None
        self._send_lock = asyncio.Lock()  # the zlib stream must be written in order

    async def send(self, payload: dict[str, Any]) -> None:
        text = json.dumps(payload)
        async with self._send_lock:
            if self._zlib is not None:
                chunk = self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
                await self.ws.send_bytes(chunk)
            else:
                await self.ws.send_str(text)


# --------------------------------------------------------------------------- the fake


class FakeDiscord:
    """Discord REST + gateway + CDN on 127.0.0.1 with a free port. Use `async with`."""

    def __init__(
        self,
        *,
        bot_name: str = "stembot",
        heartbeat_interval_ms: int = 41250,
        default_attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
        max_upload_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self._ids = itertools.count()
        self._last_snowflake = 0
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.default_attachment_size_limit = default_attachment_size_limit
        self.max_upload_bytes = max_upload_bytes

        self.application_id = self.snowflake()
        self.bot_user: dict[str, Any] = {
            "id": str(self.application_id),
            "username": bot_name,
            "global_name": None,
            "discriminator": "0",
            "avatar": None,
            "bot": True,
            "verified": True,
            "flags": 0,
            "mfa_enabled": False,
        }
        self.user: dict[str, Any] = self.make_user("tester")  # who invokes commands by default
        self.guild_id = self.snowflake()
        self.channel_id = self.snowflake()  # the default guild text channel

        self.users: dict[int, dict[str, Any]] = {}
        self.channels: dict[int, dict[str, Any]] = {}
        self.messages: dict[int, FakeMessage] = {}  # insertion order is creation order
        self.attachments: dict[int, FakeAttachment] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.requests: list[RecordedRequest] = []
        self.gateway_frames: list[dict[str, Any]] = []  # every frame the client sent
        self.gateway_urls: list[str] = []  # path+query of every websocket the client opened

        self._register_user(self.bot_user)
        self._register_user(self.user)
        self._add_guild_text_channel(self.channel_id, "general")

        self._interactions_by_token: dict[str, FakeInteraction] = {}
        self._dm_channel_by_user: dict[int, int] = {}
        self._failures: list[_InjectedFailure] = []
        self._connections: list[_GatewayConnection] = []
        self._active: _GatewayConnection | None = None
        self._session_id: str | None = None
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._routes = self._build_routes()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Start listening on 127.0.0.1 on a free port."""
        app = web.Application(client_max_size=self.max_upload_bytes)
        app.router.add_route("*", r"/api/v{version:\d+}/{tail:.*}", self._handle_api)
        app.router.add_get("/gateway", self._handle_gateway)
        app.router.add_get("/resume-gateway", self._handle_gateway)
        app.router.add_get("/cdn/attachments/{attachment_id}/{filename}", self._handle_cdn)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # Bind the socket ourselves so the port is known before anything connects.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        """Close open websockets and stop the server."""
        for connection in list(self._connections):
            with contextlib.suppress(Exception):
                await connection.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeDiscord is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/gateway"

    @property
    def resume_gateway_url(self) -> str:
        # A different path from the first connect, so tests can see a RESUME used it.
        return f"ws://127.0.0.1:{self._port}/resume-gateway"

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

    async def _wait_client_ready(self, client: discord.Client, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            # wait_until_ready() refuses to run before login, and login precedes IDENTIFY.
            await self.wait_for_identify(timeout=timeout)
            await client.wait_until_ready()

    # ------------------------------------------------------------------ ids, users, channels

    def snowflake(self) -> int:
        """A new, increasing Discord-style id."""
        candidate = ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(self._ids) & 0x3FFFFF)
        self._last_snowflake = max(candidate, self._last_snowflake + 1)
        return self._last_snowflake

    def make_user(self, username: str) -> dict[str, Any]:
        """A user payload with a fresh id (registered once used in an interaction)."""
        return {
            "id": str(self.snowflake()),
            "username": username,
            "global_name": username.title(),
            "discriminator": "0",
            "avatar": None,
            "bot": False,
            "public_flags": 0,
        }

    def _register_user(self, user: dict[str, Any]) -> None:
        self.users[int(user["id"])] = user

    def _add_guild_text_channel(self, channel_id: int, name: str) -> dict[str, Any]:
        channel = {
            "id": str(channel_id),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": name,
            "position": len(self.channels),
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }
        self.channels[channel_id] = channel
        return channel

    def _dm_channel_for(self, user: dict[str, Any]) -> dict[str, Any]:
        user_id = int(user["id"])
        channel_id = self._dm_channel_by_user.get(user_id)
        if channel_id is None:
            channel_id = self.snowflake()
            self._dm_channel_by_user[user_id] = channel_id
            self.channels[channel_id] = {
                "id": str(channel_id),
                "type": 1,
                "recipients": [user],
                "last_message_id": None,
                "flags": 0,
            }
        return self.channels[channel_id]

    # ------------------------------------------------------------------ attachments and messages

    def add_attachment(
        self, filename: str, data: bytes, *, content_type: str | None = None, description: str | None = None
    ) -> dict[str, Any]:
        """Store a file on the fake CDN; returns its attachment payload (url points at the fake)."""
        return self._store_attachment(filename, data, content_type, description).to_payload()

    def _store_attachment(
        self, filename: str, data: bytes, content_type: str | None, description: str | None
    ) -> FakeAttachment:
        attachment_id = self.snowflake()
        if content_type is None:
            content_type = mimetypes.guess_type(filename)[0]
        url = f"{self.base_url}/cdn/attachments/{attachment_id}/{urllib.parse.quote(filename)}"
        attachment = FakeAttachment(attachment_id, filename, bytes(data), content_type, url, description)
        self.attachments[attachment_id] = attachment
        return attachment

    def add_user_message(
        self,
        content: str,
        *,
        channel_id: int | None = None,
        author: dict[str, Any] | None = None,
        attachments: Sequence[dict[str, Any]] = (),
    ) -> FakeMessage:
        """A message some user posted (e.g. the target of a message context menu)."""
        channel_id = channel_id or self.channel_id
        channel = self.channels.get(channel_id) or self._add_guild_text_channel(channel_id, f"channel-{channel_id}")
        author = author or self.user
        self._register_user(author)
        message = self._new_message(channel, author)
        message.content = content
        message.attachments = [self.attachments[int(a["id"])] for a in attachments]
        return message

    def _new_message(self, channel: dict[str, Any], author: dict[str, Any], **fields: Any) -> FakeMessage:
        guild_id = channel.get("guild_id")
        message = FakeMessage(
            id=self.snowflake(),
            channel_id=int(channel["id"]),
            author=author,
            timestamp=_now_iso(),
            guild_id=int(guild_id) if guild_id else None,
            **fields,
        )
        self.messages[message.id] = message
        channel["last_message_id"] = str(message.id)
        return message

    def _new_bot_message(self, channel_id: int, interaction: FakeInteraction | None = None) -> FakeMessage:
        channel = self.channels[channel_id]
        if interaction is None:
            return self._new_message(channel, self.bot_user)
        # Interaction responses are posted through the application's webhook.
        return self._new_message(
            channel,
            self.bot_user,
            webhook_id=self.application_id,
            application_id=self.application_id,
            interaction_id=interaction.id,
        )

    def _apply_message_payload(
        self, message: FakeMessage, payload: dict[str, Any], files: Sequence[UploadedFile], *, editing: bool
    ) -> None:
        """Create or edit `message` from a message payload, as Discord would."""
        payload = dict(payload)
        if editing:
            message.edits.append(dict(payload))  # a copy: the keys below are popped
            message.edited_timestamp = _now_iso()
            # Editing a deferred response replaces the "thinking" placeholder.
            message.flags &= ~FLAG_LOADING
        if "content" in payload:
            message.content = payload.pop("content") or ""
        if "embeds" in payload:
            message.embeds = payload.pop("embeds") or []
        if "components" in payload:
            message.components = payload.pop("components") or []
        if "flags" in payload:
            message.flags = int(payload.pop("flags") or 0)
        uploads = self._uploads_by_index(files)
        if "attachments" in payload:
            message.attachments = self._resolve_attachments(message, payload.pop("attachments") or [], uploads)
        elif uploads:
            kept = message.attachments if editing else []
            message.attachments = kept + [self._attachment_from_upload(u, None) for u in uploads.values()]
        payload.pop("allowed_mentions", None)
        message.extra.update(payload)

    @staticmethod
    def _uploads_by_index(files: Sequence[UploadedFile]) -> dict[int, UploadedFile]:
        uploads: dict[int, UploadedFile] = {}
        for position, upload in enumerate(files):
            match = _FILE_FIELD.fullmatch(upload.field)
            uploads[int(match.group(1)) if match else position] = upload
        return uploads

    def _attachment_from_upload(self, upload: UploadedFile, description: str | None) -> FakeAttachment:
        # discord.py labels every upload application/octet-stream; Discord sniffs the name.
        content_type = upload.content_type
        if content_type in (None, "application/octet-stream"):
            content_type = mimetypes.guess_type(upload.filename)[0] or content_type
        return self._store_attachment(upload.filename, upload.data, content_type, description)

    def _resolve_attachments(
        self, message: FakeMessage, entries: list[dict[str, Any]], uploads: dict[int, UploadedFile]
    ) -> list[FakeAttachment]:
        """`attachments` lists the files to keep: small ids name uploads, snowflakes existing files."""
        result: list[FakeAttachment] = []
        used: set[int] = set()
        existing = {a.id: a for a in message.attachments}
        for entry in entries:
            attachment_id = int(entry["id"])
            if attachment_id in uploads and attachment_id not in used:
                used.add(attachment_id)
                result.append(self._attachment_from_upload(uploads[attachment_id], entry.get("description")))
            elif attachment_id in existing:
                result.append(existing[attachment_id])
            elif attachment_id in self.attachments:
                result.append(self.attachments[attachment_id])
        result.extend(self._attachment_from_upload(u, None) for i, u in uploads.items() if i not in used)
        return result

    def messages_for(self, interaction: FakeInteraction, *, include_deleted: bool = False) -> list[FakeMessage]:
        """The interaction's original response (if any) followed by its followups.

        As on Discord, the first followup after a deferred response (type 5) does not
        add a message: it fills in the original. For component interactions answered
        with type 6/7, the original is the message the component sits on.
        """
        ids = ([interaction.original_message_id] if interaction.original_message_id else []) + interaction.followup_ids
        found = [self.messages[i] for i in ids]
        return [m for m in found if include_deleted or not m.deleted]

    def channel_messages(self, channel_id: int, *, include_deleted: bool = False) -> list[FakeMessage]:
        """Every message in a channel, oldest first."""
        return [
            m for m in self.messages.values() if m.channel_id == channel_id and (include_deleted or not m.deleted)
        ]

    def threads(self, parent_id: int | None = None) -> list[dict[str, Any]]:
        """Threads the bot opened (in `parent_id`, or anywhere), oldest first."""
        return [
            c for c in self.channels.values()
            if c.get("type") in (10, 11, 12) and (parent_id is None or int(c["parent_id"]) == parent_id)
        ]

    # ------------------------------------------------------------------ request log and failures

    @property
    def unhandled_requests(self) -> list[RecordedRequest]:
        """Requests no route of the fake knew (answered 404): what the fake is missing."""
        return [r for r in self.requests if r.route is None and r.status == 404]

    def requests_matching(self, method: str, path_pattern: str) -> list[RecordedRequest]:
        """Recorded requests with this method ("*" for any) whose path fully matches the regex."""
        pattern = re.compile(path_pattern)
        return [r for r in self.requests if method in ("*", r.method) and pattern.fullmatch(r.path)]

    def fail_next(
        self,
        method: str,
        path_pattern: str,
        *,
        status: int = 429,
        retry_after: float = 0.1,
        times: int = 1,
        is_global: bool = False,
    ) -> None:
        """Answer the next `times` matching requests with `status` (429s carry `retry_after`).

        `path_pattern` is a regex matched in full against the path below the API base,
        e.g. r"/webhooks/\\d+/[^/]+" for interaction followups.
        """
        self._failures.append(
            _InjectedFailure(method.upper(), re.compile(path_pattern), status, retry_after, is_global, times)
        )

    def _take_failure(self, method: str, path: str) -> _InjectedFailure | None:
        for failure in self._failures:
            if failure.remaining > 0 and failure.method in ("*", method) and failure.pattern.fullmatch(path):
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure
        return None

    @staticmethod
    def _failure_response(failure: _InjectedFailure) -> tuple[int, dict[str, Any], web.Response]:
        if failure.status == 429:
            body = {
                "message": "You are being rate limited.",
                "retry_after": failure.retry_after,
                "global": failure.is_global,
                "code": 0,
            }
            # Without a Via header discord.py takes a 429 for a Cloudflare ban and gives up.
            headers = {
                "Via": "1.1 google",
                "Retry-After": str(max(1, int(failure.retry_after + 0.999))),
                "X-RateLimit-Scope": "global" if failure.is_global else "user",
            }
            if failure.is_global:
                headers["X-RateLimit-Global"] = "true"
            return 429, body, _json_response(body, 429, headers)
        body = {"message": f"{failure.status}: injected failure", "code": 0}
        return failure.status, body, _json_response(body, failure.status)

    async def wait_for(
        self, predicate: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.01, what: str | None = None
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
        self, interaction: FakeInteraction, count: int = 1, *, timeout: float = 5.0
    ) -> list[FakeMessage]:
        """Wait until the interaction has `count` messages (original included) that are not loading."""

        def settled() -> list[FakeMessage] | None:
            messages = self.messages_for(interaction)
            if len(messages) >= count and not any(m.is_loading for m in messages[:count]):
                return messages
            return None

        what = f"{count} settled message(s) for interaction {interaction.id}"
        return await self.wait_for(settled, timeout=timeout, what=what)

    # ------------------------------------------------------------------ gateway

    @property
    def identifies(self) -> list[dict[str, Any]]:
        """The `d` of every IDENTIFY the client sent."""
        return [f["d"] for f in self.gateway_frames if f.get("op") == 2]

    @property
    def resumes(self) -> list[dict[str, Any]]:
        """The `d` of every RESUME the client sent."""
        return [f["d"] for f in self.gateway_frames if f.get("op") == 6]

    @property
    def session_id(self) -> str | None:
        """The gateway session READY handed out; a RESUME must name it."""
        return self._session_id

    async def wait_for_identify(self, *, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the client has IDENTIFYed and been sent READY; returns the IDENTIFY data."""
        await self.wait_for(lambda: self._active is not None and self.identifies, timeout=timeout, what="IDENTIFY")
        return self.identifies[-1]

    async def dispatch(self, event: str, data: dict[str, Any], *, timeout: float = 5.0) -> None:
        """Send a DISPATCH (op 0) event on the live gateway connection."""
        connection = await self.wait_for(lambda: self._active, timeout=timeout, what="a live gateway connection")
        self._seq += 1
        await connection.send({"op": 0, "t": event, "s": self._seq, "d": data})

    async def send_reconnect(self, *, timeout: float = 10.0) -> dict[str, Any]:
        """Send op 7 RECONNECT; wait for the client's RESUME (answered with RESUMED) and return it."""
        connection = await self.wait_for(lambda: self._active, timeout=timeout, what="a live gateway connection")
        resumes_before = len(self.resumes)
        # No dispatch may go to a socket the client is about to drop.
        self._active = None
        await connection.send({"op": 7, "d": None})
        await self.wait_for(
            lambda: len(self.resumes) > resumes_before and self._active is not None, timeout=timeout, what="RESUME"
        )
        return self.resumes[-1]

    async def _handle_gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        self.gateway_urls.append(str(request.rel_url))
        connection = _GatewayConnection(ws, str(request.rel_url), request.query.get("compress"))
        self._connections.append(connection)
        try:
            await connection.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                payload = json.loads(frame.data)
                self.gateway_frames.append(payload)
                await self._on_gateway_op(connection, payload)
        finally:
            self._connections.remove(connection)
            if self._active is connection:
                self._active = None
        return ws

    async def _on_gateway_op(self, connection: _GatewayConnection, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d") or {}
        if op == 1:  # HEARTBEAT
            await connection.send({"op": 11})
        elif op == 2:  # IDENTIFY
            self._session_id = f"fake-session-{secrets.token_hex(8)}"
            self._seq = 1
            ready: dict[str, Any] = {
                "v": 10,
                "user": self.bot_user,
                "guilds": [],
                "session_id": self._session_id,
                "resume_gateway_url": self.resume_gateway_url,
                "application": {"id": str(self.application_id), "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
            }
            if "shard" in data:
                ready["shard"] = data["shard"]
            await connection.send({"op": 0, "t": "READY", "s": self._seq, "d": ready})
            self._active = connection
        elif op == 6:  # RESUME
            if data.get("session_id") != self._session_id:
                await connection.send({"op": 9, "d": False})  # INVALID_SESSION, not resumable
                return
            self._seq += 1
            await connection.send({"op": 0, "t": "RESUMED", "s": self._seq, "d": {}})
            self._active = connection
        # PRESENCE (3), VOICE_STATE (4), REQUEST_MEMBERS (8): recorded, nothing to answer.

    # ------------------------------------------------------------------ sending interactions

    async def send_interaction(
        self,
        interaction_type: int,
        data: dict[str, Any],
        *,
        message: FakeMessage | dict[str, Any] | None = None,
        user: dict[str, Any] | None = None,
        in_guild: bool = True,
        channel_id: int | None = None,
        attachment_size_limit: int | None = None,
        locale: str = "en-US",
        app_permissions: int = DEFAULT_APP_PERMISSIONS,
        member_permissions: int = DEFAULT_APP_PERMISSIONS,
        roles: Sequence[int] = (),
    ) -> FakeInteraction:
        """Send any INTERACTION_CREATE; the other send_* methods take these keywords too.

        In a guild (the default) the user arrives as `member`; with in_guild=False it
        is a bot DM carrying `user`.
        """
        user = user or self.user
        self._register_user(user)
        interaction_id = self.snowflake()
        token = f"fake-interaction-token-{secrets.token_hex(16)}"
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": interaction_type,
            "data": data,
            "token": token,
            "version": 1,
            "app_permissions": str(app_permissions),
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            # discord.py reads this unconditionally (Interaction.filesize_limit).
            "attachment_size_limit": attachment_size_limit or self.default_attachment_size_limit,
        }
        if in_guild:
            channel_id = channel_id or self.channel_id
            channel = self.channels.get(channel_id) or self._add_guild_text_channel(channel_id, f"channel-{channel_id}")
            payload.update(
                guild_id=str(self.guild_id),
                guild_locale="en-US",
                guild={"id": str(self.guild_id), "locale": "en-US", "features": []},
                member={
                    "user": user,
                    "roles": [str(r) for r in roles],
                    "permissions": str(member_permissions),
                    "joined_at": _now_iso(),
                    "flags": 0,
                    "nick": None,
                    "avatar": None,
                    "pending": False,
                    "deaf": False,
                    "mute": False,
                },
                context=0,
                authorizing_integration_owners={"0": str(self.guild_id)},
            )
        else:
            channel = self._dm_channel_for(user)
            payload.update(user=user, context=1, authorizing_integration_owners={"0": "0"})
        payload["channel_id"] = channel["id"]
        payload["channel"] = channel
        message_id = None
        if message is not None:
            message_payload = message.to_payload() if isinstance(message, FakeMessage) else message
            payload["message"] = message_payload
            message_id = int(message_payload["id"])

        interaction = FakeInteraction(
            id=interaction_id,
            token=token,
            type=interaction_type,
            payload=payload,
            channel_id=int(channel["id"]),
            guild_id=self.guild_id if in_guild else None,
            user=user,
            message_id=message_id,
        )
        self.interactions[interaction_id] = interaction
        self._interactions_by_token[token] = interaction
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def _command_id(self, name: str, command_type: int, guild_id: int | None) -> str:
        registered = self.guild_commands.get(guild_id, []) if guild_id else self.commands
        for command in registered:
            if command["name"] == name and command.get("type", 1) == command_type:
                return command["id"]
        return str(self.snowflake())

    async def send_slash_command(
        self,
        name: str,
        options: Sequence[dict[str, Any]] = (),
        *,
        attachments: Sequence[dict[str, Any]] = (),
        command_guild_id: int | None = None,
        **context: Any,
    ) -> FakeInteraction:
        """A /command (CHAT_INPUT). Attachment options are resolved from the fake's store.

        `command_guild_id` marks a command registered to that guild (sets data.guild_id).
        """
        resolved_attachments = {str(a["id"]): a for a in attachments}
        for attachment_id in self._attachment_option_ids(options):
            stored = self.attachments.get(int(attachment_id))
            if stored is not None:
                resolved_attachments.setdefault(str(attachment_id), stored.to_payload())
        data: dict[str, Any] = {
            "id": self._command_id(name, 1, command_guild_id),
            "name": name,
            "type": 1,
            "options": list(options),
        }
        resolved: dict[str, Any] = {}
        if resolved_attachments:
            resolved["attachments"] = resolved_attachments
        # Channel and role options arrive with their objects, as Discord sends them.
        for option in self._options_of_type(options, 7):
            channel = self.channels.get(int(option["value"])) or {
                "id": str(option["value"]), "type": 0, "name": f"channel-{option['value']}",
                "guild_id": str(self.guild_id), "position": 0}
            resolved.setdefault("channels", {})[str(option["value"])] = {
                **channel, "permissions": str(DEFAULT_APP_PERMISSIONS)}
        for option in self._options_of_type(options, 8):
            resolved.setdefault("roles", {})[str(option["value"])] = {
                "id": str(option["value"]), "name": f"role-{option['value']}", "color": 0, "hoist": False,
                "position": 1, "permissions": "0", "managed": False, "mentionable": True, "flags": 0}
        if resolved:
            data["resolved"] = resolved
        if command_guild_id is not None:
            data["guild_id"] = str(command_guild_id)
        return await self.send_interaction(INTERACTION_APPLICATION_COMMAND, data, **context)

    @classmethod
    def _options_of_type(cls, options: Sequence[dict[str, Any]], option_type: int) -> Iterator[dict[str, Any]]:
        for option in options:
            if option.get("type") == option_type:
                yield option
            yield from cls._options_of_type(option.get("options", []), option_type)

    @classmethod
    def _attachment_option_ids(cls, options: Sequence[dict[str, Any]]) -> Iterator[str]:
        for option in options:
            if option.get("type") == 11:
                yield str(option["value"])
            yield from cls._attachment_option_ids(option.get("options", []))

    async def send_message_command(
        self, name: str, target: FakeMessage | dict[str, Any], *, command_guild_id: int | None = None, **context: Any
    ) -> FakeInteraction:
        """A message context-menu command run on `target`."""
        target_payload = target.to_payload() if isinstance(target, FakeMessage) else target
        data: dict[str, Any] = {
            "id": self._command_id(name, 3, command_guild_id),
            "name": name,
            "type": 3,
            "target_id": target_payload["id"],
            "resolved": {"messages": {target_payload["id"]: target_payload}},
        }
        if command_guild_id is not None:
            data["guild_id"] = str(command_guild_id)
        return await self.send_interaction(INTERACTION_APPLICATION_COMMAND, data, **context)

    async def send_component(
        self,
        custom_id: str,
        message: FakeMessage | dict[str, Any],
        *,
        component_type: int = 2,
        values: Sequence[str] | None = None,
        **context: Any,
    ) -> FakeInteraction:
        """A click on a button (component_type 2) or a select choice (pass `values`) on `message`."""
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            data["values"] = list(values)
        if isinstance(message, FakeMessage) and "channel_id" not in context and message.guild_id is not None:
            context["channel_id"] = message.channel_id
        return await self.send_interaction(INTERACTION_MESSAGE_COMPONENT, data, message=message, **context)

    # ------------------------------------------------------------------ HTTP plumbing

    def _build_routes(self) -> list[tuple[str, re.Pattern[str], str, Callable[..., Any]]]:
        snowflake, token = r"(?P<{}>\d+)", r"(?P<token>[^/]+)"
        table = [
            ("GET", "/gateway", "get_gateway", self._get_gateway),
            ("GET", "/gateway/bot", "get_bot_gateway", self._get_bot_gateway),
            ("GET", "/users/@me", "get_current_user", self._get_current_user),
            ("GET", f"/users/{snowflake.format('user_id')}", "get_user", self._get_user),
            ("GET", "/oauth2/applications/@me", "get_application", self._get_application),
            ("POST", "/users/@me/channels", "create_dm", self._create_dm),
            (
                "POST",
                f"/interactions/{snowflake.format('interaction_id')}/{token}/callback",
                "interaction_callback",
                self._interaction_callback,
            ),
            ("POST", f"/webhooks/{snowflake.format('app_id')}/{token}", "create_followup", self._create_followup),
            (
                "GET|PATCH|DELETE",
                f"/webhooks/{snowflake.format('app_id')}/{token}/messages/(?P<message_id>@original|\\d+)",
                "webhook_message",
                self._webhook_message,
            ),
            ("GET", f"/channels/{snowflake.format('channel_id')}", "get_channel", self._get_channel),
            (
                "POST",
                f"/channels/{snowflake.format('channel_id')}/messages",
                "create_message",
                self._create_channel_message,
            ),
            (
                "GET|PATCH|DELETE",
                f"/channels/{snowflake.format('channel_id')}/messages/{snowflake.format('message_id')}",
                "channel_message",
                self._channel_message,
            ),
            ("POST", f"/channels/{snowflake.format('channel_id')}/typing", "typing", self._typing),
            (
                "POST",
                f"/channels/{snowflake.format('channel_id')}/messages/{snowflake.format('message_id')}/threads",
                "start_thread_from_message",
                self._start_thread_from_message,
            ),
            ("POST", f"/channels/{snowflake.format('channel_id')}/threads", "start_thread", self._start_thread),
            ("GET|PUT", f"/applications/{snowflake.format('app_id')}/commands", "global_commands", self._commands),
            (
                "GET|PUT",
                f"/applications/{snowflake.format('app_id')}/guilds/{snowflake.format('guild_id')}/commands",
                "guild_commands",
                self._commands,
            ),
        ]
        return [(methods, re.compile(pattern), name, handler) for methods, pattern, name, handler in table]

    async def _read_body(self, request: web.Request) -> tuple[Any, list[UploadedFile]]:
        files: list[UploadedFile] = []
        if request.content_type.startswith("multipart/"):
            body: Any = None
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    body = json.loads(await part.text())
                elif part.filename is not None:
                    data = await part.read(decode=False)
                    content_type = part.headers.get("Content-Type")
                    files.append(UploadedFile(part.name or "", part.filename, content_type, bytes(data)))
            return body, files
        raw = await request.read()
        if not raw:
            return None, files
        try:
            return json.loads(raw), files
        except ValueError:
            return raw.decode(errors="replace"), files

    def _record(self, request: web.Request, path: str, body: Any, files: list[UploadedFile]) -> RecordedRequest:
        record = RecordedRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            headers=dict(request.headers),
            json=body,
            files=files,
            time=time.monotonic(),
        )
        self.requests.append(record)
        return record

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body, files = await self._read_body(request)
        record = self._record(request, path, body, files)
        failure = self._take_failure(request.method, path)
        if failure is not None:
            record.status, record.response, response = self._failure_response(failure)
            return response
        for methods, pattern, name, handler in self._routes:
            match = pattern.fullmatch(path)
            if match and request.method in methods.split("|"):
                record.route = name
                try:
                    result = handler(record, **match.groupdict())
                except _ApiError as error:
                    record.status = error.status
                    record.response = {"message": error.message, "code": error.code}
                    return _json_response(record.response, error.status)
                if result is _NO_CONTENT:
                    record.status = 204
                    return web.Response(status=204)
                record.status, record.response = 200, result
                return _json_response(result)
        record.status = 404
        record.response = {"message": "404: Not Found", "code": 0}
        return _json_response(record.response, 404)

    async def _handle_cdn(self, request: web.Request) -> web.StreamResponse:
        record = self._record(request, request.path, None, [])
        record.route = "cdn_attachment"
        failure = self._take_failure(request.method, request.path)
        if failure is not None:
            record.status, record.response, response = self._failure_response(failure)
            return response
        attachment_id = request.match_info["attachment_id"]
        attachment = self.attachments.get(int(attachment_id)) if attachment_id.isdigit() else None
        if attachment is None:
            record.status = 404
            return web.Response(status=404, text="Not Found")
        record.status = 200
        return web.Response(body=attachment.data, content_type=attachment.content_type or "application/octet-stream")

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        body, files = await self._read_body(request)
        record = self._record(request, request.path, body, files)
        record.status = 404
        record.response = {"message": "404: Not Found", "code": 0}
        return _json_response(record.response, 404)

    # ------------------------------------------------------------------ REST routes

    def _get_gateway(self, record: RecordedRequest) -> dict[str, Any]:
        return {"url": self.gateway_url}

    def _get_bot_gateway(self, record: RecordedRequest) -> dict[str, Any]:
        return {
            "url": self.gateway_url,
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
        }

    def _get_current_user(self, record: RecordedRequest) -> dict[str, Any]:
        return self.bot_user

    def _get_user(self, record: RecordedRequest, user_id: str) -> dict[str, Any]:
        user = self.users.get(int(user_id))
        if user is None:
            raise _ApiError(404, 10013, "Unknown User")
        return user

    def _get_application(self, record: RecordedRequest) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": self.bot_user["username"],
            "description": "",
            "icon": None,
            "bot_public": False,
            "bot_require_code_grant": False,
            "owner": self.user,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.bot_user,
            "summary": "",
        }

    def _create_dm(self, record: RecordedRequest) -> dict[str, Any]:
        recipient_id = int((record.json or {})["recipient_id"])
        recipient = self.users.get(recipient_id) or {
            "id": str(recipient_id),
            "username": f"user-{recipient_id}",
            "global_name": None,
            "discriminator": "0",
            "avatar": None,
        }
        return self._dm_channel_for(recipient)

    def _interaction_by_token(self, token: str) -> FakeInteraction:
        interaction = self._interactions_by_token.get(token)
        if interaction is None:
            raise _ApiError(404, 10062, "Unknown interaction")
        return interaction

    def _interaction_callback(self, record: RecordedRequest, interaction_id: str, token: str) -> Any:
        interaction = self._interaction_by_token(token)
        if interaction.id != int(interaction_id):
            raise _ApiError(404, 10062, "Unknown interaction")
        if interaction.acknowledged:
            raise _ApiError(400, 40060, "Interaction has already been acknowledged.")
        body = record.json or {}
        callback_type = body.get("type")
        data = body.get("data") or {}
        message: FakeMessage | None = None
        if callback_type in (CALLBACK_CHANNEL_MESSAGE, CALLBACK_DEFERRED_CHANNEL_MESSAGE):
            message = self._new_bot_message(interaction.channel_id, interaction)
            message.type = self._response_message_type(interaction)
            if callback_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE:
                message.flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
            else:
                self._apply_message_payload(message, data, record.files, editing=False)
        elif callback_type in (CALLBACK_DEFERRED_UPDATE_MESSAGE, CALLBACK_UPDATE_MESSAGE):
            message = self.messages.get(interaction.message_id) if interaction.message_id else None
            if message is None:
                raise _ApiError(400, 50035, "Invalid Form Body: no message to update for this interaction")
            if callback_type == CALLBACK_UPDATE_MESSAGE:
                self._apply_message_payload(message, data, record.files, editing=True)
        interaction.callback_type = callback_type
        interaction.callback_data = data
        if message is not None:
            interaction.original_message_id = message.id

        if not _is_truthy_query(record.query.get("with_response")):
            return _NO_CONTENT
        # The shape discord.py reads in InteractionCallbackResponse: response_message_id is
        # how it learns which message a View sent with the response lives on.
        summary: dict[str, Any] = {
            "id": str(interaction.id),
            "type": interaction.type,
            "response_message_loading": callback_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE,
            "response_message_ephemeral": bool(message and message.is_ephemeral),
        }
        if message is not None:
            summary["response_message_id"] = str(message.id)
        response: dict[str, Any] = {"interaction": summary}
        if message is not None and callback_type != CALLBACK_DEFERRED_UPDATE_MESSAGE:
            response["resource"] = {"type": callback_type, "message": message.to_payload()}
        return response

    @staticmethod
    def _response_message_type(interaction: FakeInteraction) -> int:
        if interaction.type == INTERACTION_APPLICATION_COMMAND:
            return 20 if interaction.payload["data"].get("type", 1) == 1 else 23  # CHAT_INPUT / CONTEXT_MENU
        return 0

    def _acknowledged_interaction(self, app_id: str, token: str) -> FakeInteraction:
        interaction = self._interactions_by_token.get(token)
        # Discord only opens the interaction webhook once the interaction was acknowledged.
        if int(app_id) != self.application_id or interaction is None or not interaction.acknowledged:
            raise _ApiError(404, 10015, "Unknown Webhook")
        return interaction

    def _create_followup(self, record: RecordedRequest, app_id: str, token: str) -> Any:
        interaction = self._acknowledged_interaction(app_id, token)
        original = self.messages.get(interaction.original_message_id) if interaction.original_message_id else None
        if original is not None and original.is_loading and not interaction.followup_ids:
            # Discord turns the first followup after a deferred response into that response:
            # it replaces the "thinking" placeholder, and the defer fixed its ephemerality.
            ephemeral = original.flags & FLAG_EPHEMERAL
            self._apply_message_payload(original, record.json or {}, record.files, editing=True)
            original.flags = (original.flags & ~FLAG_EPHEMERAL) | ephemeral
            return original.to_payload() if _is_truthy_query(record.query.get("wait")) else _NO_CONTENT
        message = self._new_bot_message(interaction.channel_id, interaction)
        self._apply_message_payload(message, record.json or {}, record.files, editing=False)
        interaction.followup_ids.append(message.id)
        return message.to_payload() if _is_truthy_query(record.query.get("wait")) else _NO_CONTENT

    def _webhook_message(self, record: RecordedRequest, app_id: str, token: str, message_id: str) -> Any:
        interaction = self._acknowledged_interaction(app_id, token)
        if message_id == "@original":
            target_id = interaction.original_message_id
        else:
            target_id = int(message_id)
            if target_id not in interaction.followup_ids and target_id != interaction.original_message_id:
                target_id = None
        message = self.messages.get(target_id) if target_id else None
        if message is None or message.deleted:
            raise _ApiError(404, 10008, "Unknown Message")
        return self._message_method(record, message)

    def _message_method(self, record: RecordedRequest, message: FakeMessage) -> Any:
        if record.method == "DELETE":
            message.deleted = True
            return _NO_CONTENT
        if record.method == "PATCH":
            self._apply_message_payload(message, record.json or {}, record.files, editing=True)
        return message.to_payload()

    def _channel(self, channel_id: str) -> dict[str, Any]:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            raise _ApiError(404, 10003, "Unknown Channel")
        return channel

    def _get_channel(self, record: RecordedRequest, channel_id: str) -> dict[str, Any]:
        return self._channel(channel_id)

    def _create_channel_message(self, record: RecordedRequest, channel_id: str) -> dict[str, Any]:
        self._channel(channel_id)
        message = self._new_bot_message(int(channel_id))
        self._apply_message_payload(message, record.json or {}, record.files, editing=False)
        return message.to_payload()

    def _channel_message(self, record: RecordedRequest, channel_id: str, message_id: str) -> Any:
        self._channel(channel_id)
        message = self.messages.get(int(message_id))
        if message is None or message.deleted or message.channel_id != int(channel_id):
            raise _ApiError(404, 10008, "Unknown Message")
        return self._message_method(record, message)

    def _start_thread_from_message(self, record: RecordedRequest, channel_id: str, message_id: str) -> Any:
        parent = self._channel(channel_id)
        message = self.messages.get(int(message_id))
        if message is None or message.deleted or message.channel_id != int(channel_id):
            raise _ApiError(404, 10008, "Unknown Message")
        if int(message_id) in self.channels:
            raise _ApiError(400, 160004, "A thread has already been created for this message")
        # As on Discord, a thread started from a message has the message's id.
        return self._add_thread(parent, int(message_id), record.json or {}, thread_type=11)

    def _start_thread(self, record: RecordedRequest, channel_id: str) -> Any:
        parent = self._channel(channel_id)
        body = record.json or {}
        return self._add_thread(parent, self.snowflake(), body, thread_type=int(body.get("type") or 12))

    def _add_thread(self, parent: dict[str, Any], thread_id: int, body: dict[str, Any], *, thread_type: int
                    ) -> dict[str, Any]:
        if parent.get("type") not in (0, 5) or "guild_id" not in parent:
            raise _ApiError(400, 50024, "Cannot execute action on this channel type")
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise _ApiError(400, 50035, "Invalid Form Body: name must be 1 to 100 characters")
        now = _now_iso()
        thread = {
            "id": str(thread_id),
            "type": thread_type,
            "guild_id": parent["guild_id"],
            "parent_id": parent["id"],
            "owner_id": self.bot_user["id"],
            "name": name,
            "last_message_id": None,
            "rate_limit_per_user": body.get("rate_limit_per_user") or 0,
            "message_count": 0,
            "member_count": 1,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": body.get("auto_archive_duration") or 4320,
                "archive_timestamp": now,
                "locked": False,
                "create_timestamp": now,
            },
        }
        self.channels[thread_id] = thread
        return thread

    def _typing(self, record: RecordedRequest, channel_id: str) -> Any:
        self._channel(channel_id)
        return _NO_CONTENT

    def _commands(self, record: RecordedRequest, app_id: str, guild_id: str | None = None) -> list[dict[str, Any]]:
        if int(app_id) != self.application_id:
            raise _ApiError(404, 10002, "Unknown Application")
        current = self.guild_commands.get(int(guild_id), []) if guild_id else self.commands
        if record.method == "GET":
            return current
        known_ids = {(c["name"], c.get("type", 1)): c["id"] for c in current}
        synced = []
        for command in record.json or []:
            command_type = command.get("type", 1)
            synced.append(
                {
                    "description": "",
                    **command,
                    "id": known_ids.get((command["name"], command_type)) or str(self.snowflake()),
                    "application_id": str(self.application_id),
                    "type": command_type,
                    "version": str(self.snowflake()),
                    **({"guild_id": guild_id} if guild_id else {}),
                }
            )
        if guild_id:
            self.guild_commands[int(guild_id)] = synced
        else:
            self.commands = synced
        return synced
