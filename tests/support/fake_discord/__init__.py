"""A fake Discord (REST API, gateway websocket and attachment CDN) on loopback, for end-to-end tests."""

from .constants import (
    CALLBACK_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_UPDATE_MESSAGE,
    CALLBACK_UPDATE_MESSAGE,
    DEFAULT_APP_PERMISSIONS,
    DEFAULT_ATTACHMENT_SIZE_LIMIT,
    DISCORD_EPOCH_MS,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    INTERACTION_APPLICATION_COMMAND,
    INTERACTION_CALLBACK_DEADLINE_S,
    INTERACTION_MESSAGE_COMPONENT,
    REQUEST_ENTITY_TOO_LARGE,
    UNKNOWN_INTERACTION,
)
from .fake import FakeDiscord
from .options import attachment_option, boolean_option, integer_option, string_option, subcommand_option
from .records import FakeAttachment, FakeInteraction, FakeMessage, RecordedRequest, UploadedFile

__all__ = [
    "CALLBACK_CHANNEL_MESSAGE",
    "CALLBACK_DEFERRED_CHANNEL_MESSAGE",
    "CALLBACK_DEFERRED_UPDATE_MESSAGE",
    "CALLBACK_UPDATE_MESSAGE",
    "DEFAULT_APP_PERMISSIONS",
    "DEFAULT_ATTACHMENT_SIZE_LIMIT",
    "DISCORD_EPOCH_MS",
    "FLAG_EPHEMERAL",
    "FLAG_LOADING",
    "INTERACTION_APPLICATION_COMMAND",
    "INTERACTION_CALLBACK_DEADLINE_S",
    "INTERACTION_MESSAGE_COMPONENT",
    "REQUEST_ENTITY_TOO_LARGE",
    "UNKNOWN_INTERACTION",
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
