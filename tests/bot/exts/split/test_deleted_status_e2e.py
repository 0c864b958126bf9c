"""A status message deleted while its job runs (by its user or a moderator) does not lose
the answer: the edit through the interaction token gets 404 Unknown Message, and the
result goes to the channel mentioning only the user, or by DM when the channel is gone
too. Exactly once."""

from __future__ import annotations

import asyncio

import pytest

from tests.bot.helpers import upload
from tests.support.fake_discord import attachment_option

pytestmark = pytest.mark.asyncio(loop_scope="module")


def done(messages) -> list:
    return [m for m in messages if "Done" in m.content]


def dm_messages(fake) -> list:
    return [m for m in fake.messages.values() if m.channel_id in fake._dm_channel_by_user.values()]


async def start_and_delete_status(fake, tmp_path, name: str):
    att = upload(fake, tmp_path, name=name, seconds=30.0)
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
    status = await fake.wait_for(
        lambda: next((m for m in fake.messages_for(interaction) if "Separating" in m.content), None),
        timeout=60, what="the status message")
    # As a moderator would: the message is gone for Discord, and so for the webhook's edits.
    fake.messages[status.id].deleted = True
    return interaction, status


async def test_deleted_status_message_the_result_goes_to_the_channel_once(fake, bot, tmp_path):
    before = len(fake.channel_messages(fake.channel_id))
    interaction, status = await start_and_delete_status(fake, tmp_path, "deleted.wav")
    await fake.wait_for(lambda: done(fake.channel_messages(fake.channel_id)[before:]), timeout=120,
                        what="the result in the channel")
    await asyncio.sleep(3)  # time for a second delivery, were there one
    posted = done(fake.channel_messages(fake.channel_id)[before:])
    assert len(posted) == 1, "the stems go out exactly once"
    assert posted[0].id != status.id and not done([fake.messages[status.id]])
    assert posted[0].content.startswith(f"<@{fake.user['id']}>")
    assert [a.filename for a in posted[0].attachments] == ["drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3",
                                                           "preview.png"]
    sent = [r for r in fake.requests if r.method == "POST" and r.path == f"/channels/{fake.channel_id}/messages"
            and "Done" in (r.json or {}).get("content", "")]
    assert len(sent) == 1
    mentions = sent[0].json["allowed_mentions"]
    assert mentions.get("parse", []) == [] and [int(u) for u in mentions["users"]] == [int(fake.user["id"])]


async def test_deleted_status_message_and_channel_the_result_comes_by_dm_once(fake, bot, tmp_path):
    dms_before = len(dm_messages(fake))
    interaction, status = await start_and_delete_status(fake, tmp_path, "gone.wav")
    channel = fake.channels.pop(fake.channel_id)
    try:
        await fake.wait_for(lambda: done(dm_messages(fake)[dms_before:]), timeout=120, what="the result by DM")
        await asyncio.sleep(3)
        dm = done(dm_messages(fake)[dms_before:])
    finally:
        fake.channels[fake.channel_id] = channel
    assert len(dm) == 1 and len(dm[0].attachments) == 5
    assert not done(fake.messages_for(interaction))
