"""The operator's word over server admins, through the real bot and the fake Discord: a
member in two servers has one allowance, links the operator turned off stay off, and
servers outside the allow-list (and DMs, when turned off) get a refusal and nothing else."""

from __future__ import annotations

import sqlite3

import pytest
import pytest_asyncio

from tests.bot.conftest import BotProcess
from tests.bot.helpers import MANAGE_SERVER, final_message, private_answer, subcommand, upload
from tests.support.fake_discord import attachment_option, boolean_option, string_option

pytestmark = pytest.mark.asyncio(loop_scope="module")

YOUTUBE = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bot(fake, model_dir, tmp_path_factory):
    """A bot whose operator allows two servers (the fake's own and a second one), no DMs
    and no YouTube or SoundCloud links; members get 30 s of audio and one job at once."""
    second_guild, _ = fake.add_guild()
    process = BotProcess(fake, tmp_path_factory.mktemp("ceilings-bot"), model_dir,
                         STEMBOT_ALLOWED_GUILDS=f"{fake.guild_id},{second_guild}", STEMBOT_DMS_ALLOWED="false",
                         STEMBOT_FORBID_STREAMING_LINKS="true", STEMBOT_QUOTA_USER_MINUTES_PER_DAY="0.5",
                         STEMBOT_QUOTA_USER_CONCURRENT_JOBS="1")
    process.second_guild = second_guild
    await process.start()
    yield process
    await process.stop()


async def test_a_member_in_two_servers_cannot_use_two_allowances(fake, bot, tmp_path):
    member = fake.make_user("traveller")
    first = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "a.wav", 20))],
                                          user=member)
    await fake.wait_for(lambda: fake.messages_for(first), timeout=10)
    # While it runs, the other server does not give a second job at once ...
    busy = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "b.wav", 3))],
                                         user=member, guild_id=bot.second_guild)
    assert "already have 1 job(s) in progress" in await private_answer(fake, busy)
    assert "Done" in (await final_message(fake, first)).content

    # ... nor a second day's allowance: 20 s of 30 s are used, wherever the member asks.
    other = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "c.wav", 15))],
                                          user=member, guild_id=bot.second_guild)
    refused = await final_message(fake, other)
    assert "Couldn't split" in refused.content
    assert "your daily allowance has 0.2 min left (counted across every server and DM" in refused.content
    quota = await fake.send_slash_command("quota", user=member, guild_id=bot.second_guild)
    text = await private_answer(fake, quota)
    assert "0.2 of 0.5 min left today" in text and "every server" in text

    database = sqlite3.connect(bot.data_dir / "stembot.sqlite3")
    member_id = int(member["id"])
    used = {g: round(seconds, 3) for g, seconds in database.execute(
        "SELECT guild_id, used_s FROM quota_usage WHERE user_id = ?", (member_id,))}
    # -1: the member's counter across servers.
    assert (used[-1], used[fake.guild_id], used.get(bot.second_guild, 0.0)) == (20.0, 20.0, 0.0)
    # The refused job gave back what it took: a short track still fits.
    fits = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "d.wav", 5))],
                                         user=member, guild_id=bot.second_guild)
    assert "Done" in (await final_message(fake, fits)).content


async def test_streaming_links_stay_off_when_the_operator_forbids_them(fake, bot):
    admin = await fake.send_slash_command(
        "stembot", subcommand("links", boolean_option("allowed", True), boolean_option("streaming", True)),
        member_permissions=MANAGE_SERVER)
    assert await private_answer(fake, admin) == (
        "The bot's operator has turned YouTube and SoundCloud links off on this bot; a server can't turn them on. "
        "Nothing was changed.")
    settings = await fake.send_slash_command("stembot", subcommand("settings"), member_permissions=MANAGE_SERVER)
    assert ("**Links:** allowed; YouTube and SoundCloud not allowed by the bot's operator"
            in await private_answer(fake, settings))
    job = await fake.send_slash_command("split", [string_option("url", YOUTUBE)])
    assert await private_answer(fake, job) == (
        "YouTube and SoundCloud links are turned off on this bot; attach the file instead.")
    # Direct links, which the operator allows, a server can still turn off and on.
    admin = await fake.send_slash_command("stembot", subcommand("links", boolean_option("allowed", True)),
                                          member_permissions=MANAGE_SERVER)
    assert "Links are now allowed; YouTube and SoundCloud links are not allowed" in await private_answer(fake, admin)


async def test_a_server_outside_the_allow_list_gets_a_refusal_and_nothing_else(fake, bot, tmp_path):
    elsewhere, _ = fake.add_guild()
    song = upload(fake, tmp_path, "e.wav", 3)
    for name, options, permissions in (("split", [attachment_option("file", song)], 0),
                                       ("quota", [], 0),
                                       ("stembot", subcommand("settings"), MANAGE_SERVER),
                                       ("challenge", subcommand("list"), 0)):
        interaction = await fake.send_slash_command(name, options, guild_id=elsewhere,
                                                    member_permissions=permissions)
        assert await private_answer(fake, interaction) == "stembot isn't enabled on this server."
    database = sqlite3.connect(bot.data_dir / "stembot.sqlite3")
    assert database.execute("SELECT count(*) FROM jobs WHERE guild_id = ?", (elsewhere,)).fetchone() == (0,)
    # The servers on the list work as before.
    listed = await fake.send_slash_command("challenge", subcommand("list"), guild_id=bot.second_guild)
    assert "No remix challenges" in await private_answer(fake, listed)


async def test_dms_follow_the_operators_setting(fake, bot):
    interaction = await fake.send_slash_command("quota", in_guild=False)
    assert await private_answer(fake, interaction) == (
        "stembot doesn't work in direct messages here; use it in a server.")
