"""Where the bot works: the servers on the operator's allow-list (STEMBOT_ALLOWED_GUILDS,
unset: every server) and DMs (STEMBOT_DMS_ALLOWED). Elsewhere every command and button
gets a short refusal and nothing else happens."""

from __future__ import annotations

import discord

from core.settings import Settings

NOT_ENABLED = "stembot isn't enabled on this server."
NO_DMS = "stembot doesn't work in direct messages here; use it in a server."


def refusal(settings: Settings, guild_id: int | None) -> str | None:
    """Why the bot does not work where this interaction comes from, or None."""
    if guild_id is None:
        return None if settings.dms_allowed else NO_DMS
    allowed = settings.allowed_guild_ids
    return None if allowed is None or guild_id in allowed else NOT_ENABLED


async def admitted(interaction: discord.Interaction) -> bool:
    """Whether the interaction may go on; if not, it has been answered (autocompletes get
    no suggestions: they cannot carry a message)."""
    reason = refusal(interaction.client.settings, interaction.guild_id)  # type: ignore[attr-defined]  # a StemBot
    if reason is None:
        return True
    if interaction.type is not discord.InteractionType.autocomplete:
        await interaction.response.send_message(reason, ephemeral=True)
    return False


class GatedTree(discord.app_commands.CommandTree):
    """The bot's command tree: every command and context menu passes `admitted` first."""

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return await admitted(interaction)
