"""A bot killed after admitting a job but before its defer reached Discord: the interaction
was never answered and never can be. After the restart the job is cancelled, its slot and
minutes released, and its user told once, in the channel and mentioning only them, to send
the request again."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from tests.bot.conftest import BotProcess
from tests.bot.helpers import upload
from tests.support.fake_discord import FakeDiscord, attachment_option

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_a_job_whose_interaction_was_never_answered_is_cancelled_and_its_user_told(tmp_path, model_dir):
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", model_dir)
        database = tmp_path / "bot" / "stembot.sqlite3"
        try:
            await bot.start()
            member = fake.make_user("member")
            # The defer never reaches Discord: the bot is killed while sending it.
            fake.hold_next("POST", r"/interactions/\d+/[^/]+/callback")
            lost = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path))],
                                                 user=member)
            await fake.wait_for(lambda: fake.held, timeout=30, what="the defer (after the admission)")
            await bot.kill()
            with closing(sqlite3.connect(database)) as db:
                assert db.execute("SELECT state, status_message_id FROM jobs").fetchall() == [("queued", None)]

            await bot.start()
            told = await fake.wait_for(
                lambda: [m for m in fake.channel_messages(fake.channel_id) if "was lost" in m.content],
                timeout=30, what="the member told in the channel")

            [message] = told
            assert message.content.startswith(f"<@{member['id']}> ")
            [post] = [r for r in fake.requests_matching("POST", rf"/channels/{fake.channel_id}/messages")
                      if "was lost" in (r.json or {}).get("content", "")]
            mentions = post.json["allowed_mentions"]  # only the member may be pinged
            assert mentions["parse"] == [] and [str(u) for u in mentions["users"]] == [member["id"]]
            assert not lost.acknowledged and fake.messages_for(lost) == []
            def rows():
                with closing(sqlite3.connect(database)) as db:
                    return db.execute("SELECT state, error_kind, slot_state, quota_state, notified_at IS NOT NULL "
                                      "FROM jobs").fetchall()

            # The bot records that it told the member once Discord has answered its post, a
            # moment after the fake shows the message.
            await fake.wait_for(lambda: rows()[0][4] == 1, timeout=10, what="notified_at to be recorded")
            assert rows() == [("cancelled", "unanswered", "released", "none", 1)]
        finally:
            await bot.kill()
