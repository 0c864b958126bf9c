"""The fake's data: ids, users, the guild and its channels, messages, attachments, interactions, commands."""

from __future__ import annotations

import itertools
import mimetypes
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from .constants import DISCORD_EPOCH_MS, FLAG_LOADING
from .records import FakeAttachment, FakeInteraction, FakeMessage, UploadedFile, now_iso

_FILE_FIELD = re.compile(r"files?\[?(\d+)\]?")


class DiscordState:
    """Everything the fake holds, and how Discord creates and edits messages in it.

    `attachment_url(attachment_id, filename)` gives the CDN URL of a stored file.
    """

    def __init__(self, *, bot_name: str, attachment_url: Callable[[int, str], str]) -> None:
        self._ids = itertools.count()
        self._last_snowflake = 0
        self._attachment_url = attachment_url

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
        self.interactions_by_token: dict[str, FakeInteraction] = {}
        self.dm_channel_by_user: dict[int, int] = {}
        self.commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.guild_default_channel: dict[int, int] = {}  # of the servers added with add_guild
        # Per server, the largest attachment_size_limit its interactions announced (its boost
        # tier); channel messages there may carry files that large, elsewhere the default.
        self.guild_attachment_size_limit: dict[int, int] = {}

        self.register_user(self.bot_user)
        self.register_user(self.user)
        self.add_guild_text_channel(self.channel_id, "general")

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

    def register_user(self, user: dict[str, Any]) -> None:
        self.users[int(user["id"])] = user

    def add_guild(self) -> tuple[int, int]:
        """Another server the bot is in, with a text channel: (its id, the channel's id).
        Interactions come from it with `guild_id=` (and that channel by default)."""
        guild_id, channel_id = self.snowflake(), self.snowflake()
        self.add_guild_text_channel(channel_id, "general", guild_id=guild_id)
        self.guild_default_channel[guild_id] = channel_id
        return guild_id, channel_id

    def add_guild_text_channel(self, channel_id: int, name: str, guild_id: int | None = None) -> dict[str, Any]:
        channel = {
            "id": str(channel_id),
            "type": 0,
            "guild_id": str(guild_id or self.guild_id),
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

    def guild_channel(self, channel_id: int) -> dict[str, Any]:
        """The channel with this id, created as a guild text channel if the fake has none."""
        return self.channels.get(channel_id) or self.add_guild_text_channel(channel_id, f"channel-{channel_id}")

    def dm_channel_for(self, user: dict[str, Any]) -> dict[str, Any]:
        user_id = int(user["id"])
        channel_id = self.dm_channel_by_user.get(user_id)
        if channel_id is None:
            channel_id = self.snowflake()
            self.dm_channel_by_user[user_id] = channel_id
            self.channels[channel_id] = {
                "id": str(channel_id),
                "type": 1,
                "recipients": [user],
                "last_message_id": None,
                "flags": 0,
            }
        return self.channels[channel_id]

    def threads(self, parent_id: int | None = None) -> list[dict[str, Any]]:
        """Threads the bot opened (in `parent_id`, or anywhere), oldest first."""
        return [
            c for c in self.channels.values()
            if c.get("type") in (10, 11, 12) and (parent_id is None or int(c["parent_id"]) == parent_id)
        ]

    # ------------------------------------------------------------------ interactions

    def add_interaction(self, interaction: FakeInteraction) -> None:
        self.interactions[interaction.id] = interaction
        self.interactions_by_token[interaction.token] = interaction
        if interaction.guild_id is not None:
            known = self.guild_attachment_size_limit.get(interaction.guild_id, 0)
            self.guild_attachment_size_limit[interaction.guild_id] = max(known, interaction.attachment_size_limit)

    # ------------------------------------------------------------------ attachments

    def add_attachment(
        self, filename: str, data: bytes, *, content_type: str | None = None, description: str | None = None
    ) -> dict[str, Any]:
        """Store a file on the fake CDN; returns its attachment payload (url points at the fake)."""
        return self.store_attachment(filename, data, content_type, description).to_payload()

    def store_attachment(
        self, filename: str, data: bytes, content_type: str | None, description: str | None
    ) -> FakeAttachment:
        attachment_id = self.snowflake()
        if content_type is None:
            content_type = mimetypes.guess_type(filename)[0]
        url = self._attachment_url(attachment_id, filename)
        attachment = FakeAttachment(attachment_id, filename, bytes(data), content_type, url, description)
        self.attachments[attachment_id] = attachment
        return attachment

    # ------------------------------------------------------------------ messages

    def add_user_message(
        self,
        content: str,
        *,
        channel_id: int | None = None,
        author: dict[str, Any] | None = None,
        attachments: Sequence[dict[str, Any]] = (),
    ) -> FakeMessage:
        """A message some user posted (e.g. the target of a message context menu)."""
        channel = self.guild_channel(channel_id or self.channel_id)
        author = author or self.user
        self.register_user(author)
        message = self.new_message(channel, author)
        message.content = content
        message.attachments = [self.attachments[int(a["id"])] for a in attachments]
        return message

    def new_message(self, channel: dict[str, Any], author: dict[str, Any], **fields: Any) -> FakeMessage:
        guild_id = channel.get("guild_id")
        message = FakeMessage(
            id=self.snowflake(),
            channel_id=int(channel["id"]),
            author=author,
            timestamp=now_iso(),
            guild_id=int(guild_id) if guild_id else None,
            **fields,
        )
        self.messages[message.id] = message
        channel["last_message_id"] = str(message.id)
        return message

    def new_bot_message(self, channel_id: int, interaction: FakeInteraction | None = None) -> FakeMessage:
        channel = self.channels[channel_id]
        if interaction is None:
            return self.new_message(channel, self.bot_user)
        # Interaction responses are posted through the application's webhook.
        return self.new_message(
            channel,
            self.bot_user,
            webhook_id=self.application_id,
            application_id=self.application_id,
            interaction_id=interaction.id,
        )

    def apply_message_payload(
        self, message: FakeMessage, payload: dict[str, Any], files: Sequence[UploadedFile], *, editing: bool
    ) -> None:
        """Create or edit `message` from a message payload, as Discord would."""
        payload = dict(payload)
        if editing:
            message.edits.append(dict(payload))  # a copy: the keys below are popped
            message.edited_timestamp = now_iso()
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
        return self.store_attachment(upload.filename, upload.data, content_type, description)

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
