"""Server administration: policies, quotas, channels, statistics, and owner controls."""

from ._cog import Admin


async def setup(bot) -> None:
    await bot.add_cog(Admin(bot))
