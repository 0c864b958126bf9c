"""The Vote button under each entry. A DynamicItem: its custom id carries the entry id,
so votes keep working after a restart without any view being re-attached."""

from __future__ import annotations

import re

import discord

VOTE_PREFIX = "stembot:vote:"


class VoteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"stembot:vote:(?P<entry_id>[0-9]+)"):
    def __init__(self, entry_id: int):
        super().__init__(discord.ui.Button(label="Vote", style=discord.ButtonStyle.primary, emoji="🗳️",
                                           custom_id=f"{VOTE_PREFIX}{entry_id}"))
        self.entry_id = entry_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /):
        return cls(int(match["entry_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = interaction.client.get_cog("Challenges")
        await cog.vote_from_button(interaction, self.entry_id)


def vote_view(entry_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(VoteButton(entry_id))
    return view
