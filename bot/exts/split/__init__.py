"""Splitting songs: commands, the job's status message, and delivery of the stems."""

from ._cog import Split
from ._views import CancelButton


async def setup(bot) -> None:
    bot.add_dynamic_items(CancelButton)
    await bot.add_cog(Split(bot))
