"""`/stembot` through the fake Discord: who may use it, and that settings take effect."""

from __future__ import annotations

import asyncio

import pytest

from tests.bot.helpers import MANAGE_SERVER, final_message, private_answer, subcommand, upload
from tests.support.fake_discord import attachment_option, string_option

pytestmark = pytest.mark.asyncio(loop_scope="module")




async def admin(fake, name, *options, permissions=MANAGE_SERVER, **context):
    interaction = await fake.send_slash_command("stembot", subcommand(name, *options), member_permissions=permissions,
                                                **context)
    await fake.wait_for(lambda: interaction.acknowledged, timeout=5, what=f"/stembot {name}")
    assert interaction.callback_data["flags"] & 64, "admin replies are ephemeral"
    return interaction.callback_data["content"]





async def test_only_server_managers_may_change_settings(fake, bot):
    text = await admin(fake, "limit", string_option("name", "user_concurrent_jobs"),
                       {"type": 10, "name": "value", "value": 3}, permissions=0)
    assert "Manage Server" in text


async def test_limits_show_and_reset(fake, bot):
    assert "is now 3" in await admin(fake, "limit", string_option("name", "user_concurrent_jobs"),
                                     {"type": 10, "name": "value", "value": 3})
    shown = await admin(fake, "settings")
    assert "**Jobs at once per member:** 3 *(set here)*" in shown
    assert "must be a whole number" in await admin(fake, "limit", string_option("name", "guild_queued_jobs"),
                                                   {"type": 10, "name": "value", "value": 2.5})
    assert "is now the default" in await admin(fake, "limit", string_option("name", "user_concurrent_jobs"))
    assert "**Jobs at once per member:** 2\n" in await admin(fake, "settings")


async def test_an_admin_cannot_lift_a_limit_above_the_operators_ceiling(fake, bot):
    """Out of the box (no STEMBOT_CEILING_* set) the ceilings hold: 240 min per member,
    4 jobs at once, 100 queued per server, tracks up to STEMBOT_MAX_DURATION_S."""
    for name, value, ceiling in (("user_minutes_per_day", 1e9, "240"), ("user_concurrent_jobs", 10**6, "4"),
                                 ("guild_queued_jobs", 10**6, "100"), ("guild_minutes_per_day", 1e9, "6000"),
                                 ("max_track_minutes", 1e6, "20:00")):
        text = await admin(fake, "limit", string_option("name", name), {"type": 10, "name": "value", "value": value})
        assert text == (f"`{name}` can be at most {ceiling} on this bot (the ceiling its operator set); "
                        "nothing was changed.")
    shown = await admin(fake, "settings")
    assert "**Minutes per member per day:** 60\n" in shown and "**Jobs at once per member:** 2\n" in shown
    assert "set here" not in shown

    # Up to the ceiling is fine, and the settings say that it is the ceiling.
    assert "is now 4" in await admin(fake, "limit", string_option("name", "user_concurrent_jobs"),
                                     {"type": 10, "name": "value", "value": 4})
    assert "**Jobs at once per member:** 4 *(the bot's ceiling)* *(set here)*" in await admin(fake, "settings")
    await admin(fake, "limit", string_option("name", "user_concurrent_jobs"))

    # A role tier cannot lift them either.
    role = fake.snowflake()
    text = await admin(fake, "tier", {"type": 8, "name": "role", "value": str(role)},
                       {"type": 10, "name": "minutes_per_day", "value": 100000.0},
                       {"type": 4, "name": "concurrent_jobs", "value": 3})
    assert text == ("`minutes_per_day` can be at most 240 on this bot (the ceiling its operator set); "
                    "nothing was changed.")
    assert "**Tier**" not in await admin(fake, "settings")


async def test_channel_restriction(fake, bot, tmp_path):
    other = fake.snowflake()
    assert f"<#{other}>" in await admin(fake, "channel", string_option("action", "add"),
                                        {"type": 7, "name": "channel", "value": str(other)})
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "t.wav", 4.0))])
    assert "not enabled in this channel" in await private_answer(fake, job)
    assert "every channel" in await admin(fake, "channel", string_option("action", "clear"))


async def test_allowed_formats_and_server_default_format(fake, bot, tmp_path):
    assert "Formats allowed: flac" in await admin(fake, "formats", string_option("allowed", "flac"))
    assert "Unknown format" in await admin(fake, "formats", string_option("allowed", "aiff"))
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "t.wav", 4.0)),
                                                  string_option("format", "mp3")])
    assert "allows these formats: flac" in await private_answer(fake, job)
    assert "format flac" in await admin(fake, "defaults", string_option("format", "flac"))
    job = await fake.send_slash_command("karaoke", [attachment_option("file", upload(fake, tmp_path, "k.wav", 4.0))])
    result = await final_message(fake, job)
    assert [a.filename for a in result.attachments][:2] == ["vocals.flac", "no_vocals.flac"]
    await admin(fake, "formats", string_option("allowed", "all"))


async def test_owner_pauses_and_resumes_the_queue(fake, bot, tmp_path):
    stranger = fake.make_user("stranger")
    assert "Only the bot's owner" in await admin(fake, "pause", user=stranger)
    assert "Paused" in await admin(fake, "pause", permissions=0)  # fake.user owns the application
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "p.wav", 4.0))])
    await asyncio.sleep(3)
    assert not any("Done" in m.content for m in fake.messages_for(job))
    workers = await admin(fake, "workers", permissions=0)
    assert "ready" in workers and "(paused)" in workers and "1 waiting" in workers
    assert "Resumed" in await admin(fake, "resume", permissions=0)
    assert "Done" in (await final_message(fake, job)).content


async def test_stats(fake, bot, tmp_path):
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "s.wav", 4.0))])
    await final_message(fake, job)
    await asyncio.sleep(0.5)  # the row turns `done` just after the result is sent
    text = await admin(fake, "stats", string_option("period", "day"))
    assert "**Last day:**" in text and "done" in text and "Busiest: <@" in text
