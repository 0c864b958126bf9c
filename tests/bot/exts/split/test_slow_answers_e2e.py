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
from tests.support.fake_discord import FLAG_EPHEMERAL, attachment_option

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
        admitted = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path,
                                                                                             seconds=3.0))])
        refused = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path,
                                                                                           "other.wav"))])
        await lock

        result = await final_message(fake, admitted, timeout=180)  # a shared CI machine can be slow
        assert "Done" in result.content
        assert result.id == admitted.original_message_id  # the deferred reply became the result
        # The second job is over the member's one job at once: the refusal reaches only them,
        # and the public "thinking" placeholder it had to show goes away.
        [answer] = await fake.wait_for(lambda: fake.messages_for(refused), what="the refusal")
        assert answer.is_ephemeral and "in progress" in answer.content
        assert all(m.deleted for m in fake.messages_for(refused, include_deleted=True) if m.id != answer.id)
        for interaction in (admitted, refused):
            [callback] = fake.requests_matching("POST", rf"/interactions/{interaction.id}/.*/callback")
            assert callback.status in (200, 204), callback.response  # not 404: it came in time
        assert not result.flags & FLAG_EPHEMERAL
    finally:
        await bot.stop()
