"""Remix challenges: /challenge start, submit, status, end, list; the Vote buttons; and the
scheduler that acts on the deadlines."""

from ._cog import Challenges
from ._views import VoteButton


async def setup(bot) -> None:
    bot.add_dynamic_items(VoteButton)
    await bot.add_cog(Challenges(bot))
