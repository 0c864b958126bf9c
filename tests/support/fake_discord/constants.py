"""Discord API numbers the fake speaks: interaction and callback types, message flags, permissions."""

DISCORD_EPOCH_MS = 1420070400000
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024
# Discord refuses an interaction's initial response after this long (404, code 10062).
INTERACTION_CALLBACK_DEADLINE_S = 3.0

# JSON error codes Discord answers with.
UNKNOWN_INTERACTION = 10062
REQUEST_ENTITY_TOO_LARGE = 40005

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
