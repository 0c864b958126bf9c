"""What the fake stores and records: uploaded files, requests, attachments, messages, interactions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .constants import FLAG_EPHEMERAL, FLAG_LOADING


def now_iso() -> str:
    """The current time as Discord writes timestamps."""
    return datetime.now(UTC).isoformat()


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
    sent_at: float = field(default_factory=time.monotonic)  # when the fake dispatched it
    callback_type: int | None = None
    callback_data: dict[str, Any] | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return self.callback_type is not None

    @property
    def attachment_size_limit(self) -> int:
        """The most bytes one file may have in an answer to it (the guild's boost tier, or DMs)."""
        return int(self.payload["attachment_size_limit"])
