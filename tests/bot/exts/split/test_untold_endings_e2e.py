"""A job that ended while the bot was down (a worker failed it, say) is told to its user
after the restart, once: whether it was told is kept in the job row (`notified_at`),
not in the memory of the bot that died."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from datetime import UTC, datetime

import pytest

from tests.bot.conftest import BotProcess
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="function")


def answers(fake: FakeDiscord) -> list:
    """What the bot sent to the members: edits and follow-ups through interaction tokens,
    channel posts, DMs."""
    return [r for r in fake.requests if r.method in ("POST", "PATCH")
            and (r.path.startswith("/webhooks/") or (r.path.startswith("/channels/") and r.path.endswith("/messages")))]


async def test_a_job_failed_while_the_bot_was_down_is_told_once_after_restarts(tmp_path, model_dir):
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", model_dir)
        try:
            await bot.start()
            song = music(tmp_path / "long.wav", seconds=60.0, tone=random.uniform(200.0, 900.0))
            att = fake.add_attachment("long.wav", song.read_bytes(), content_type="audio/wav")
            interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
            await fake.wait_for(lambda: any("Separating" in m.content for m in fake.messages_for(interaction)),
                                timeout=60, what="separation to start")
            await bot.kill()
            # As a worker would while the bot is down: the job fails in its row.
            database = sqlite3.connect(tmp_path / "bot" / "stembot.sqlite3")
            now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
            database.execute("UPDATE jobs SET state = 'failed', error = 'the worker ran out of memory', "
                             "error_kind = 'error', finished_at = ?", (now,))
            database.commit()

            await bot.start()
            told = await fake.wait_for(
                lambda: [m for m in fake.messages_for(interaction) if "Couldn't split" in m.content],
                timeout=30, what="the failure told after the restart")
            assert len(told) == 1 and "ran out of memory" in told[0].content
            # The token is still valid: the status message itself says so.
            assert told[0].id == fake.messages_for(interaction)[0].id
            await fake.wait_for(lambda: database.execute("SELECT notified_at FROM jobs").fetchone()[0] is not None,
                                timeout=10, what="the end noted as told")
            await bot.stop()

            before = len(answers(fake))
            await bot.start()
            await asyncio.sleep(5)  # time to tell it again, were it to
            await bot.stop()
            assert answers(fake)[before:] == [], "a second restart tells nobody again"
            assert database.execute("SELECT state FROM jobs").fetchall() == [("failed",)]
        finally:
            await bot.kill()  # a failed test leaves no bot behind
