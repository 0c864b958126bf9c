"""Sending interactions to the bot: slash commands, message context menus and component clicks."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from .constants import DEFAULT_APP_PERMISSIONS, INTERACTION_APPLICATION_COMMAND, INTERACTION_MESSAGE_COMPONENT
from .records import FakeInteraction, FakeMessage, now_iso
from .state import DiscordState


class InteractionSender:
    """Builds INTERACTION_CREATE payloads from the fake's state and sends them through `dispatch`."""

    def __init__(
        self,
        state: DiscordState,
        dispatch: Callable[[str, dict[str, Any]], Awaitable[None]],
        *,
        default_attachment_size_limit: int,
    ) -> None:
        self.state = state
        self._dispatch = dispatch
        self.default_attachment_size_limit = default_attachment_size_limit

    async def send_interaction(
        self,
        interaction_type: int,
        data: dict[str, Any],
        *,
        message: FakeMessage | dict[str, Any] | None = None,
        user: dict[str, Any] | None = None,
        in_guild: bool = True,
        guild_id: int | None = None,
        channel_id: int | None = None,
        attachment_size_limit: int | None = None,
        locale: str = "en-US",
        app_permissions: int = DEFAULT_APP_PERMISSIONS,
        member_permissions: int = DEFAULT_APP_PERMISSIONS,
        roles: Sequence[int] = (),
    ) -> FakeInteraction:
        """Send any INTERACTION_CREATE; the other send_* methods take these keywords too.

        In a guild (the default) the user arrives as `member`; with in_guild=False it
        is a bot DM carrying `user`. `guild_id` names a server made with `add_guild`
        (default: the fake's own).
        """
        state = self.state
        guild_id = guild_id or state.guild_id
        if channel_id is None and guild_id != state.guild_id:
            channel_id = state.guild_default_channel[guild_id]
        user = user or state.user
        state.register_user(user)
        interaction_id = state.snowflake()
        token = f"fake-interaction-token-{secrets.token_hex(16)}"
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(state.application_id),
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
            channel = state.guild_channel(channel_id or state.channel_id)
            payload.update(
                guild_id=str(guild_id),
                guild_locale="en-US",
                guild={"id": str(guild_id), "locale": "en-US", "features": []},
                member={
                    "user": user,
                    "roles": [str(r) for r in roles],
                    "permissions": str(member_permissions),
                    "joined_at": now_iso(),
                    "flags": 0,
                    "nick": None,
                    "avatar": None,
                    "pending": False,
                    "deaf": False,
                    "mute": False,
                },
                context=0,
                authorizing_integration_owners={"0": str(guild_id)},
            )
        else:
            channel = state.dm_channel_for(user)
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
            guild_id=guild_id if in_guild else None,
            user=user,
            message_id=message_id,
        )
        state.add_interaction(interaction)
        await self._dispatch("INTERACTION_CREATE", payload)
        return interaction

    def _command_id(self, name: str, command_type: int, guild_id: int | None) -> str:
        registered = self.state.guild_commands.get(guild_id, []) if guild_id else self.state.commands
        for command in registered:
            if command["name"] == name and command.get("type", 1) == command_type:
                return command["id"]
        return str(self.state.snowflake())

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
        state = self.state
        resolved_attachments = {str(a["id"]): a for a in attachments}
        for attachment_id in self._attachment_option_ids(options):
            stored = state.attachments.get(int(attachment_id))
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
            channel = state.channels.get(int(option["value"])) or {
                "id": str(option["value"]), "type": 0, "name": f"channel-{option['value']}",
                "guild_id": str(state.guild_id), "position": 0}
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
