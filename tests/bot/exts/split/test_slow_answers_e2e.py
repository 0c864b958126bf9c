"""End to end: a command whose database work outlasts Discord's 3 s is deferred in time.

The fault is real: another connection holds the bot's SQLite database locked (BEGIN
EXCLUSIVE, as a backup or a manual change would) for longer than Discord waits, so the
admission of a job blocks. The fake Discord refuses an answer after 3 s, as Discord does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing

import pytest

from tests.bot.conftest import BotProcess
from tests.bot.helpers import final_message, upload
from tests.support.fake_discord import attachment_option

pytestmark = pytest.mark.asyncio(loop_scope="module")

LOCKED_S = 4.0  # longer than Discord's 3 s


async def hold_locked(database, seconds: float) -> None:
    def hold() -> None:
        with closing(sqlite3.connect(database, timeout=30, isolation_level=None)) as db:
            db.execute("BEGIN EXCLUSIVE")
            time.sleep(seconds)
            db.execute("ROLLBACK")

    await asyncio.to_thread(hold)


async def test_split_and_its_refusal_are_answered_in_time_while_the_database_is_locked(fake, model_dir, tmp_path):
    bot = BotProcess(fake, tmp_path / "data", model_dir, STEMBOT_QUOTA_USER_CONCURRENT_JOBS="1")
    await bot.start()
    database = tmp_path / "data" / "stembot.sqlite3"
    try:
        lock = asyncio.create_task(hold_locked(database, LOCKED_S))
        await asyncio.sleep(0.3)  # the lock is taken
        pair = [await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, name,
                                                                                         seconds=3.0))])
                for name in ("song.wav", "other.wav")]
        await lock

        # Both wait for the database; whichever gets it first takes the member's one job at
        # once, the other is refused: privately, the public "thinking" placeholder it had to
        # show gone.
        def private(interaction) -> list:
            return [m for m in fake.messages_for(interaction) if m.is_ephemeral]

        [refused] = await fake.wait_for(lambda: [i for i in pair if private(i)], timeout=30, what="the refusal")
        [admitted] = [i for i in pair if i is not refused]
        [answer] = fake.messages_for(refused)
        assert answer.is_ephemeral and "in progress" in answer.content
        assert [m.deleted for m in fake.messages_for(refused, include_deleted=True)] == [True, False]
        result = await final_message(fake, admitted, timeout=180)  # a shared CI machine can be slow
        assert "Done" in result.content and not result.is_ephemeral
        assert result.id == admitted.original_message_id  # the deferred reply became the result
        for interaction in (admitted, refused):
            [callback] = fake.requests_matching("POST", rf"/interactions/{interaction.id}/.*/callback")
            assert callback.status in (200, 204), callback.response  # not 404: it came in time
    finally:
        await bot.stop()
