"""The Vote button under each entry. A DynamicItem: its custom id carries the entry id,
so votes keep working after a restart without any view being re-attached."""

from __future__ import annotations

import re
from typing import Any, Self

import discord
from discord.ext import commands

from bot.access import admitted

VOTE_PREFIX = "stembot:vote:"


class VoteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"stembot:vote:(?P<entry_id>[0-9]+)"):
    def __init__(self, entry_id: int):
        super().__init__(discord.ui.Button(label="Vote", style=discord.ButtonStyle.primary, emoji="🗳️",
                                           custom_id=f"{VOTE_PREFIX}{entry_id}"))
        self.entry_id = entry_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str],
                             /) -> Self:
        return cls(int(match["entry_id"]))

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return await admitted(interaction)

    async def callback(self, interaction: discord.Interaction) -> None:
        from ._cog import Challenges  # noqa: PLC0415 - _cog imports this module (through _scheduler)

        client = interaction.client
        cog = client.get_cog("Challenges") if isinstance(client, commands.Bot) else None
        if not isinstance(cog, Challenges):  # the extension is being reloaded, or was unloaded
            await interaction.response.send_message("Voting isn't available right now; try again in a moment.",
                                                    ephemeral=True)
            return
        await cog.vote_from_button(interaction, self.entry_id)


def vote_view(entry_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(VoteButton(entry_id))
    return view
