"""The Cancel button on every job message. A DynamicItem: its custom id carries the job
id, so it keeps working after a restart without any view being re-attached."""

from __future__ import annotations

import re
from typing import Any, Self

import discord
from discord.ext import commands

from bot.access import admitted

from ._cog import Split

CANCEL_PREFIX = "stembot:cancel:"


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"stembot:cancel:(?P<job_id>[0-9]+)"):
    def __init__(self, job_id: int):
        super().__init__(discord.ui.Button(label="Cancel", style=discord.ButtonStyle.secondary, emoji="✖️",
                                           custom_id=f"{CANCEL_PREFIX}{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str],
                             /) -> Self:
        return cls(int(match["job_id"]))

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return await admitted(interaction)

    async def callback(self, interaction: discord.Interaction) -> None:
        client = interaction.client
        cog = client.get_cog("Split") if isinstance(client, commands.Bot) else None
        if not isinstance(cog, Split):  # the extension is being reloaded, or was unloaded
            await interaction.response.send_message("Cancelling isn't available right now; try again in a moment.",
                                                    ephemeral=True)
            return
        await cog.cancel_from_button(interaction, self.job_id)


def cancel_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    return view


def link_view(links: dict[str, str], player_url: str | None = None) -> discord.ui.View | None:
    """The **Open player** button (when the bot's web server is public), then download
    buttons: at most 25 in all, Discord's limit for one message."""
    if not links and not player_url:
        return None
    view = discord.ui.View(timeout=None)
    if player_url:
        view.add_item(discord.ui.Button(label="Open player", url=player_url, emoji="🎚️"))
    for label, url in list(links.items())[:25 - len(view.children)]:
        view.add_item(discord.ui.Button(label=label, url=url, emoji="⬇️"))
    return view
