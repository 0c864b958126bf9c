"""The gateway websocket: HELLO, heartbeats, IDENTIFY and READY, RESUME, and dispatching events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from .state import DiscordState


class GatewayConnection:
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


class Gateway:
    """The fake's gateway: one session, handed out by READY and resumable on another socket.

    `resume_url()` is the URL READY offers for resuming; `wait_for` polls as `FakeDiscord.wait_for`.
    """

    def __init__(
        self,
        state: DiscordState,
        *,
        heartbeat_interval_ms: int,
        resume_url: Callable[[], str],
        wait_for: Callable[..., Awaitable[Any]],
    ) -> None:
        self.state = state
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._resume_url = resume_url
        self._wait_for = wait_for
        self.frames: list[dict[str, Any]] = []  # every frame the client sent
        self.urls: list[str] = []  # path+query of every websocket the client opened
        self._connections: list[GatewayConnection] = []
        self._active: GatewayConnection | None = None
        self._session_id: str | None = None
        self._seq = 0

    @property
    def identifies(self) -> list[dict[str, Any]]:
        """The `d` of every IDENTIFY the client sent."""
        return [f["d"] for f in self.frames if f.get("op") == 2]

    @property
    def resumes(self) -> list[dict[str, Any]]:
        """The `d` of every RESUME the client sent."""
        return [f["d"] for f in self.frames if f.get("op") == 6]

    @property
    def session_id(self) -> str | None:
        """The gateway session READY handed out; a RESUME must name it."""
        return self._session_id

    async def wait_for_identify(self, *, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the client has IDENTIFYed and been sent READY; returns the IDENTIFY data."""
        await self._wait_for(lambda: self._active is not None and self.identifies, timeout=timeout, what="IDENTIFY")
        return self.identifies[-1]

    async def dispatch(self, event: str, data: dict[str, Any], *, timeout: float = 5.0) -> None:
        """Send a DISPATCH (op 0) event on the live gateway connection."""
        connection = await self._wait_for(lambda: self._active, timeout=timeout, what="a live gateway connection")
        self._seq += 1
        await connection.send({"op": 0, "t": event, "s": self._seq, "d": data})

    async def send_reconnect(self, *, timeout: float = 10.0) -> dict[str, Any]:
        """Send op 7 RECONNECT; wait for the client's RESUME (answered with RESUMED) and return it."""
        connection = await self._wait_for(lambda: self._active, timeout=timeout, what="a live gateway connection")
        resumes_before = len(self.resumes)
        # No dispatch may go to a socket the client is about to drop.
        self._active = None
        await connection.send({"op": 7, "d": None})
        await self._wait_for(
            lambda: len(self.resumes) > resumes_before and self._active is not None, timeout=timeout, what="RESUME"
        )
        return self.resumes[-1]

    async def close(self) -> None:
        """Close every open websocket."""
        for connection in list(self._connections):
            with contextlib.suppress(Exception):
                await connection.ws.close(code=1001)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        self.urls.append(str(request.rel_url))
        connection = GatewayConnection(ws, str(request.rel_url), request.query.get("compress"))
        self._connections.append(connection)
        try:
            await connection.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                payload = json.loads(frame.data)
                self.frames.append(payload)
                await self._on_op(connection, payload)
        finally:
            self._connections.remove(connection)
            if self._active is connection:
                self._active = None
        return ws

    async def _on_op(self, connection: GatewayConnection, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d") or {}
        if op == 1:  # HEARTBEAT
            await connection.send({"op": 11})
        elif op == 2:  # IDENTIFY
            self._session_id = f"fake-session-{secrets.token_hex(8)}"
            self._seq = 1
            ready: dict[str, Any] = {
                "v": 10,
                "user": self.state.bot_user,
                "guilds": [],
                "session_id": self._session_id,
                "resume_gateway_url": self._resume_url(),
                "application": {"id": str(self.state.application_id), "flags": 0},
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
