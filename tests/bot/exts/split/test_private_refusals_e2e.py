"""End to end: a member's refused file is their business. The public "thinking" message
goes away and only they see why; a failure on stembot's side stays public."""

from __future__ import annotations

import os

import pytest

from tests.bot.helpers import final_message
from tests.support.fake_discord import attachment_option

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_a_file_that_is_not_audio_is_answered_privately_and_the_public_message_goes(fake, bot):
    noise = fake.add_attachment("holiday.mp3", os.urandom(40_000), content_type="audio/mpeg")
    interaction = await fake.send_slash_command("split", [attachment_option("file", noise)])
    answer = await final_message(fake, interaction)
    assert "Couldn't split" in answer.content and "Nothing was charged" in answer.content
    assert answer.is_ephemeral
    everything = fake.messages_for(interaction, include_deleted=True)
    public = [m for m in everything if not m.is_ephemeral]
    assert public and all(m.deleted for m in public), "the public status message is deleted"
    assert [m for m in fake.messages_for(interaction) if not m.is_ephemeral] == []
