"""The REST API below /api/v10: routing, recording, and a handler per Discord route the bot uses."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .constants import (
    CALLBACK_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_UPDATE_MESSAGE,
    CALLBACK_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    INTERACTION_APPLICATION_COMMAND,
    INTERACTION_CALLBACK_DEADLINE_S,
    REQUEST_ENTITY_TOO_LARGE,
    UNKNOWN_INTERACTION,
)
from .recording import RequestLog, json_response
from .records import FakeInteraction, FakeMessage, RecordedRequest, UploadedFile, now_iso
from .state import DiscordState


class ApiError(Exception):
    """Raised by route handlers to answer with a Discord-shaped JSON error."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


NO_CONTENT = object()  # handler result meaning "answer 204"


def is_truthy_query(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true")


async def read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    """The JSON body (or multipart `payload_json`) and the uploaded files of a request."""
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


class RestApi:
    """Answers /api/v10 requests from the fake's state; `gateway_url()` is what GET /gateway hands out."""

    def __init__(
        self,
        state: DiscordState,
        log: RequestLog,
        *,
        gateway_url: Callable[[], str],
        default_attachment_size_limit: Callable[[], int],
    ) -> None:
        self.state = state
        self.log = log
        self._gateway_url = gateway_url
        self._default_attachment_size_limit = default_attachment_size_limit
        # As on Discord, an interaction not answered (nor deferred) within this is gone.
        self.callback_deadline_s = INTERACTION_CALLBACK_DEADLINE_S
        self._routes = self._build_routes()

    # ------------------------------------------------------------------ routing

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

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body, files = await read_body(request)
        record = self.log.record(request, path, body, files)
        failure = self.log.answer_injected_failure(record) or await self.log.hold_if_due(record)
        if failure is not None:
            return failure
        for methods, pattern, name, handler in self._routes:
            match = pattern.fullmatch(path)
            if match and request.method in methods.split("|"):
                record.route = name
                try:
                    result = handler(record, **match.groupdict())
                except ApiError as error:
                    record.status = error.status
                    record.response = {"message": error.message, "code": error.code}
                    return json_response(record.response, error.status)
                if result is NO_CONTENT:
                    record.status = 204
                    return web.Response(status=204)
                record.status, record.response = 200, result
                return json_response(result)
        record.status = 404
        record.response = {"message": "404: Not Found", "code": 0}
        return json_response(record.response, 404)

    async def handle_unknown(self, request: web.Request) -> web.StreamResponse:
        body, files = await read_body(request)
        record = self.log.record(request, request.path, body, files)
        record.status = 404
        record.response = {"message": "404: Not Found", "code": 0}
        return json_response(record.response, 404)

    # ------------------------------------------------------------------ gateway, users, application

    def _get_gateway(self, record: RecordedRequest) -> dict[str, Any]:
        return {"url": self._gateway_url()}

    def _get_bot_gateway(self, record: RecordedRequest) -> dict[str, Any]:
        return {
            "url": self._gateway_url(),
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
        }

    def _get_current_user(self, record: RecordedRequest) -> dict[str, Any]:
        return self.state.bot_user

    def _get_user(self, record: RecordedRequest, user_id: str) -> dict[str, Any]:
        user = self.state.users.get(int(user_id))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return user

    def _get_application(self, record: RecordedRequest) -> dict[str, Any]:
        return {
            "id": str(self.state.application_id),
            "name": self.state.bot_user["username"],
            "description": "",
            "icon": None,
            "bot_public": False,
            "bot_require_code_grant": False,
            "owner": self.state.user,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.state.bot_user,
            "summary": "",
        }

    def _create_dm(self, record: RecordedRequest) -> dict[str, Any]:
        recipient_id = int((record.json or {})["recipient_id"])
        recipient = self.state.users.get(recipient_id) or {
            "id": str(recipient_id),
            "username": f"user-{recipient_id}",
            "global_name": None,
            "discriminator": "0",
            "avatar": None,
        }
        return self.state.dm_channel_for(recipient)

    # ------------------------------------------------------------------ interaction callbacks and followups

    def _interaction_by_token(self, token: str) -> FakeInteraction:
        interaction = self.state.interactions_by_token.get(token)
        if interaction is None:
            raise ApiError(404, UNKNOWN_INTERACTION, "Unknown interaction")
        return interaction

    @staticmethod
    def _check_upload_sizes(files: list[UploadedFile], limit: int) -> None:
        """Discord refuses the whole message when one of its files is over the limit."""
        if any(len(upload.data) > limit for upload in files):
            raise ApiError(413, REQUEST_ENTITY_TOO_LARGE, "Request entity too large")

    def _channel_upload_limit(self, channel: dict[str, Any]) -> int:
        default = self._default_attachment_size_limit()
        guild_id = channel.get("guild_id")
        if guild_id is None:
            return default
        return max(default, self.state.guild_attachment_size_limit.get(int(guild_id), 0))

    def _interaction_callback(self, record: RecordedRequest, interaction_id: str, token: str) -> Any:
        interaction = self._interaction_by_token(token)
        if interaction.id != int(interaction_id):
            raise ApiError(404, UNKNOWN_INTERACTION, "Unknown interaction")
        if interaction.acknowledged:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        if record.time - interaction.sent_at > self.callback_deadline_s:
            raise ApiError(404, UNKNOWN_INTERACTION, "Unknown interaction")
        self._check_upload_sizes(record.files, interaction.attachment_size_limit)
        body = record.json or {}
        callback_type = body.get("type")
        data = body.get("data") or {}
        message: FakeMessage | None = None
        if callback_type in (CALLBACK_CHANNEL_MESSAGE, CALLBACK_DEFERRED_CHANNEL_MESSAGE):
            message = self.state.new_bot_message(interaction.channel_id, interaction)
            message.type = self._response_message_type(interaction)
            if callback_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE:
                message.flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
            else:
                self.state.apply_message_payload(message, data, record.files, editing=False)
        elif callback_type in (CALLBACK_DEFERRED_UPDATE_MESSAGE, CALLBACK_UPDATE_MESSAGE):
            message = self.state.messages.get(interaction.message_id) if interaction.message_id else None
            if message is None:
                raise ApiError(400, 50035, "Invalid Form Body: no message to update for this interaction")
            if callback_type == CALLBACK_UPDATE_MESSAGE:
                self.state.apply_message_payload(message, data, record.files, editing=True)
        interaction.callback_type = callback_type
        interaction.callback_data = data
        if message is not None:
            interaction.original_message_id = message.id

        if not is_truthy_query(record.query.get("with_response")):
            return NO_CONTENT
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
        interaction = self.state.interactions_by_token.get(token)
        # Discord only opens the interaction webhook once the interaction was acknowledged.
        if int(app_id) != self.state.application_id or interaction is None or not interaction.acknowledged:
            raise ApiError(404, 10015, "Unknown Webhook")
        return interaction

    def _create_followup(self, record: RecordedRequest, app_id: str, token: str) -> Any:
        interaction = self._acknowledged_interaction(app_id, token)
        self._check_upload_sizes(record.files, interaction.attachment_size_limit)
        original = self.state.messages.get(interaction.original_message_id) if interaction.original_message_id else None
        if original is not None and original.is_loading and not original.deleted and not interaction.followup_ids:
            # Discord turns the first followup after a deferred response into that response:
            # it replaces the "thinking" placeholder, and the defer fixed its ephemerality.
            # Once the placeholder is deleted, a followup is a message of its own.
            ephemeral = original.flags & FLAG_EPHEMERAL
            self.state.apply_message_payload(original, record.json or {}, record.files, editing=True)
            original.flags = (original.flags & ~FLAG_EPHEMERAL) | ephemeral
            return original.to_payload() if is_truthy_query(record.query.get("wait")) else NO_CONTENT
        message = self.state.new_bot_message(interaction.channel_id, interaction)
        self.state.apply_message_payload(message, record.json or {}, record.files, editing=False)
        interaction.followup_ids.append(message.id)
        return message.to_payload() if is_truthy_query(record.query.get("wait")) else NO_CONTENT

    def _webhook_message(self, record: RecordedRequest, app_id: str, token: str, message_id: str) -> Any:
        interaction = self._acknowledged_interaction(app_id, token)
        if message_id == "@original":
            target_id = interaction.original_message_id
        else:
            target_id = int(message_id)
            if target_id not in interaction.followup_ids and target_id != interaction.original_message_id:
                target_id = None
        message = self.state.messages.get(target_id) if target_id else None
        if message is None or message.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        self._check_upload_sizes(record.files, interaction.attachment_size_limit)
        return self._message_method(record, message)

    def _message_method(self, record: RecordedRequest, message: FakeMessage) -> Any:
        if record.method == "DELETE":
            message.deleted = True
            return NO_CONTENT
        if record.method == "PATCH":
            self.state.apply_message_payload(message, record.json or {}, record.files, editing=True)
        return message.to_payload()

    # ------------------------------------------------------------------ channels, messages, threads

    def _channel(self, channel_id: str) -> dict[str, Any]:
        channel = self.state.channels.get(int(channel_id))
        if channel is None:
            raise ApiError(404, 10003, "Unknown Channel")
        return channel

    def _get_channel(self, record: RecordedRequest, channel_id: str) -> dict[str, Any]:
        return self._channel(channel_id)

    def _create_channel_message(self, record: RecordedRequest, channel_id: str) -> dict[str, Any]:
        self._check_upload_sizes(record.files, self._channel_upload_limit(self._channel(channel_id)))
        message = self.state.new_bot_message(int(channel_id))
        self.state.apply_message_payload(message, record.json or {}, record.files, editing=False)
        return message.to_payload()

    def _channel_message(self, record: RecordedRequest, channel_id: str, message_id: str) -> Any:
        self._check_upload_sizes(record.files, self._channel_upload_limit(self._channel(channel_id)))
        message = self.state.messages.get(int(message_id))
        if message is None or message.deleted or message.channel_id != int(channel_id):
            raise ApiError(404, 10008, "Unknown Message")
        return self._message_method(record, message)

    def _start_thread_from_message(self, record: RecordedRequest, channel_id: str, message_id: str) -> Any:
        parent = self._channel(channel_id)
        message = self.state.messages.get(int(message_id))
        if message is None or message.deleted or message.channel_id != int(channel_id):
            raise ApiError(404, 10008, "Unknown Message")
        if int(message_id) in self.state.channels:
            raise ApiError(400, 160004, "A thread has already been created for this message")
        # As on Discord, a thread started from a message has the message's id.
        return self._add_thread(parent, int(message_id), record.json or {}, thread_type=11)

    def _start_thread(self, record: RecordedRequest, channel_id: str) -> Any:
        parent = self._channel(channel_id)
        body = record.json or {}
        return self._add_thread(parent, self.state.snowflake(), body, thread_type=int(body.get("type") or 12))

    def _add_thread(self, parent: dict[str, Any], thread_id: int, body: dict[str, Any], *, thread_type: int
                    ) -> dict[str, Any]:
        if parent.get("type") not in (0, 5) or "guild_id" not in parent:
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise ApiError(400, 50035, "Invalid Form Body: name must be 1 to 100 characters")
        now = now_iso()
        thread = {
            "id": str(thread_id),
            "type": thread_type,
            "guild_id": parent["guild_id"],
            "parent_id": parent["id"],
            "owner_id": self.state.bot_user["id"],
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
        self.state.channels[thread_id] = thread
        return thread

    def _typing(self, record: RecordedRequest, channel_id: str) -> Any:
        self._channel(channel_id)
        return NO_CONTENT

    # ------------------------------------------------------------------ application commands

    def _commands(self, record: RecordedRequest, app_id: str, guild_id: str | None = None) -> list[dict[str, Any]]:
        if int(app_id) != self.state.application_id:
            raise ApiError(404, 10002, "Unknown Application")
        current = self.state.guild_commands.get(int(guild_id), []) if guild_id else self.state.commands
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
                    "id": known_ids.get((command["name"], command_type)) or str(self.state.snowflake()),
                    "application_id": str(self.state.application_id),
                    "type": command_type,
                    "version": str(self.state.snowflake()),
                    **({"guild_id": guild_id} if guild_id else {}),
                }
            )
        if guild_id:
            self.state.guild_commands[int(guild_id)] = synced
        else:
            self.state.commands = synced
        return synced
