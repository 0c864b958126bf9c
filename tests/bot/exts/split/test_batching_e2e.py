"""The bot's own model host taking several jobs at once (as on a GPU): two members' songs
are separated side by side and both get their stems."""

from __future__ import annotations

import sqlite3

import pytest

from tests.bot.conftest import BotProcess
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_two_members_jobs_run_at_once_and_both_deliver(tmp_path, model_dir):
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", model_dir, STEMBOT_BATCH_JOBS="2")
        await bot.start()
        try:
            interactions = []
            for k, tone in enumerate((220.0, 330.0)):
                song = music(tmp_path / f"song{k}.wav", seconds=45.0, tone=tone)
                attachment = fake.add_attachment(f"song{k}.wav", song.read_bytes(), content_type="audio/wav")
                interactions.append(await fake.send_slash_command(
                    "split", [attachment_option("file", attachment)], user=fake.make_user(f"member{k}")))
            database = sqlite3.connect(tmp_path / "bot" / "stembot.sqlite3")

            def both_separating() -> bool:
                states = [row[0] for row in database.execute("SELECT state FROM jobs")]
                return states == ["separating", "separating"]
            await fake.wait_for(both_separating, timeout=90, what="both jobs separating at once")
            for interaction in interactions:
                done = await fake.wait_for(
                    lambda i=interaction: [m for m in fake.messages_for(i) if "Done" in m.content],
                    timeout=120, what="the stems")
                assert len(done[0].attachments) == 5  # four stems and the preview
            # The row says done just after the message is sent.
            await fake.wait_for(lambda: [r[0] for r in database.execute("SELECT state FROM jobs")] == ["done"] * 2,
                                timeout=10, what="both jobs done")
        finally:
            await bot.stop()
