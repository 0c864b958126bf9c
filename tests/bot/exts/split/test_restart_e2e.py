"""A bot killed in the middle of a job finishes it after a restart: the job row is the truth."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.bot.conftest import BotProcess
from tests.bot.helpers import model_hosts
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="function")



def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


async def start_long_job(fake: FakeDiscord, tmp_path: Path, seconds: float = 90.0):
    # A new tone each time, or the results cache would answer at once.
    song = music(tmp_path / "long.wav", seconds=seconds, tone=random.uniform(200.0, 900.0))
    att = fake.add_attachment("long.wav", song.read_bytes(), content_type="audio/wav")
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
    await fake.wait_for(lambda: any("Separating" in m.content for m in fake.messages_for(interaction)),
                        timeout=60, what="separation to start")
    return interaction


def results(fake: FakeDiscord, messages) -> list:
    return [m for m in messages if "Done" in m.content]


async def test_killed_bot_finishes_the_job_in_place_after_restart(tmp_path, model_dir):
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", model_dir)
        await bot.start()
        interaction = await start_long_job(fake, tmp_path)
        host = model_hosts(bot.process.pid)
        assert host, "the model host should be a child of the bot"
        # Kill only the bot: its model host must notice and exit rather than linger.
        os.kill(bot.process.pid, signal.SIGKILL)
        await bot.process.wait()
        for _ in range(50):
            if not any(alive(pid) for pid in host):
                break
            await asyncio.sleep(0.1)
        assert not any(alive(pid) for pid in host), "the model host outlived its bot"

        await bot.start()
        done = await fake.wait_for(lambda: results(fake, fake.messages_for(interaction)), timeout=120,
                                   what="the result after the restart")
        assert len(done) == 1 and len(done[0].attachments) == 5
        # The token was still valid: the result replaced the status message, not a new post.
        assert done[0].id == fake.messages_for(interaction)[0].id
        assert results(fake, fake.channel_messages(fake.channel_id)) == done
        await bot.stop()
        row = sqlite3.connect(tmp_path / "bot" / "stembot.sqlite3").execute(
            "SELECT state, attempts FROM jobs").fetchall()
        assert row == [("done", 2)]


async def test_after_the_token_expired_the_result_goes_to_the_channel_or_dm(tmp_path, model_dir):
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", model_dir)
        await bot.start()
        interaction = await start_long_job(fake, tmp_path, seconds=60.0)
        await bot.kill()
        database = sqlite3.connect(tmp_path / "bot" / "stembot.sqlite3")
        database.execute("UPDATE interaction_tokens SET expires_at = '2000-01-01 00:00:00.000000'")
        database.commit()
        channel_messages_before = len(fake.channel_messages(fake.channel_id))

        await bot.start()
        posted = await fake.wait_for(
            lambda: results(fake, fake.channel_messages(fake.channel_id)[channel_messages_before:]),
            timeout=120, what="the result posted in the channel")
        assert posted[0].content.startswith(f"<@{fake.user['id']}>")
        assert len(posted[0].attachments) == 5
        # Nothing was sent through the expired token.
        assert not results(fake, fake.messages_for(interaction))

        # Same again with the channel deleted meanwhile: the result arrives by DM.
        second = await start_long_job(fake, tmp_path, seconds=60.0)
        await bot.kill()
        database.execute("UPDATE interaction_tokens SET expires_at = '2000-01-01 00:00:00.000000' "
                         "WHERE job_id IN (SELECT id FROM jobs WHERE state != 'done')")
        database.commit()
        fake.channels.pop(fake.channel_id)
        await bot.start()
        dm = await fake.wait_for(
            lambda: [m for m in fake.messages.values()
                     if m.channel_id in fake._dm_channel_by_user.values() and "Done" in m.content],
            timeout=120, what="the result by DM")
        assert len(dm[0].attachments) == 5 and not results(fake, fake.messages_for(second))
        await bot.stop()
