"""End to end: the dispatch loop outlives a database that fails under it, and /readyz
says so meanwhile. The fault is real: the bot's own SQLite database loses its `jobs`
table for a while (renamed away by another connection, as a botched manual change or a
restore would), so every claim of a job fails with "no such table"."""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import pytest

from tests.bot.conftest import BotProcess
from tests.bot.helpers import final_message, upload
from tests.support.fake_discord import attachment_option

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def readiness(bot: BotProcess) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"{bot.ops_url}/readyz") as response:
        return response.status, await response.json()


async def wait_readiness(bot: BotProcess, status: int, timeout: float = 30.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code, body = await readiness(bot)
        if code == status or loop.time() > deadline:
            assert code == status, body
            return body
        await asyncio.sleep(0.2)


def rename_table(database, old: str, new: str) -> None:
    with sqlite3.connect(database, timeout=30) as db:
        db.execute(f"ALTER TABLE {old} RENAME TO {new}")


async def test_the_dispatch_loop_survives_a_database_error_and_readyz_shows_it(fake, model_dir, tmp_path):
    bot = BotProcess(fake, tmp_path / "data", model_dir)
    await bot.start()
    database = tmp_path / "data" / "stembot.sqlite3"
    try:
        assert (await readiness(bot))[1]["checks"]["dispatcher"] is True
        rename_table(database, "jobs", "jobs_away")
        try:
            body = await wait_readiness(bot, 503)  # the next claim fails (at most ~5 s)
            assert body["checks"]["dispatcher"] is False
        finally:
            rename_table(database, "jobs_away", "jobs")
        body = await wait_readiness(bot, 200, timeout=60)  # backoff: a few seconds at most here
        assert body["checks"]["dispatcher"] is True
        # And it takes jobs again.
        interaction = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path))])
        result = await final_message(fake, interaction)
        assert "Done" in result.content
        assert "the dispatch loop failed" in bot.log.read_text(errors="replace")
    finally:
        await bot.stop()
