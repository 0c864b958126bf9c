"""A bot killed between admitting a job (the interaction deferred: "thinking...") and
saving its status message id: after the restart the job finds its reply through the
interaction token, runs, and answers there, instead of staying "thinking" for ever."""

from __future__ import annotations

import random
import sqlite3

import pytest

from tests.bot.conftest import BotProcess
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_a_job_whose_status_message_id_was_lost_answers_in_its_reply(tmp_path, model_dir):
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", model_dir)
        try:
            await bot.start()
            song = music(tmp_path / "song.wav", seconds=20.0, tone=random.uniform(200.0, 900.0))
            att = fake.add_attachment("song.wav", song.read_bytes(), content_type="audio/wav")
            interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
            await fake.wait_for(lambda: interaction.acknowledged and fake.messages_for(interaction), timeout=30,
                                what="the deferred reply")
            await bot.kill()
            # What a kill right after the defer leaves: the job queued, no status message id.
            database = sqlite3.connect(tmp_path / "bot" / "stembot.sqlite3")
            database.execute("UPDATE jobs SET status_message_id = NULL, state = 'queued', worker = NULL, "
                             "progress = 0, artifacts = NULL")
            database.commit()
            reply = fake.messages_for(interaction)[0]

            await bot.start()
            done = await fake.wait_for(lambda: [m for m in fake.messages_for(interaction) if "Done" in m.content],
                                       timeout=120, what="the result in the reply")
            await bot.stop()
            assert len(done) == 1 and done[0].id == reply.id and len(done[0].attachments) == 5
            assert [m for m in fake.channel_messages(fake.channel_id) if "Done" in m.content] == done
            assert database.execute("SELECT state, status_message_id FROM jobs").fetchall() == [("done", reply.id)]
        finally:
            await bot.kill()  # a failed test leaves no bot behind
