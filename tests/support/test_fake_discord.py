"""The fake Discord drives a real discord.py bot: slash commands, files, buttons, 429s, RECONNECT."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands

from .fake_discord import (
    CALLBACK_DEFERRED_CHANNEL_MESSAGE,
    REQUEST_ENTITY_TOO_LARGE,
    UNKNOWN_INTERACTION,
    FakeDiscord,
    attachment_option,
    integer_option,
    string_option,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


class PressView(discord.ui.View):
    """One button; pressing it rewrites the message it sits on."""

    def __init__(self) -> None:
        super().__init__(timeout=60)

    @discord.ui.button(label="Press", custom_id="press-button")
    async def press(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.edit_message(content=f"Pressed by {interaction.user.name}", view=None)

    async def on_error(self, interaction: discord.Interaction, error: Exception, item: discord.ui.Item) -> None:
        interaction.client.errors.append(error)


@app_commands.command(name="echo", description="Repeat text, as a message and as a file")
async def echo(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.defer(thinking=True)
    await interaction.followup.send(content=text, file=discord.File(io.BytesIO(text.encode()), filename="echo.txt"))


@app_commands.command(name="retract", description="Defer, delete the placeholder, then answer privately")
async def retract(interaction: discord.Interaction) -> None:
    await interaction.response.defer(thinking=True)
    await interaction.delete_original_response()
    await interaction.followup.send("only you can see this", ephemeral=True)


@app_commands.command(name="size", description="Report the size of an uploaded file")
async def size(interaction: discord.Interaction, upload: discord.Attachment) -> None:
    data = await upload.read()  # fetched from the fake's CDN
    await interaction.response.send_message(
        f"{upload.filename}: {len(data)} bytes, limit {interaction.filesize_limit}"
    )


@app_commands.command(name="button", description="Post a button")
async def button(interaction: discord.Interaction) -> None:
    await interaction.response.send_message("Press the button", view=PressView())


@app_commands.command(name="post", description="Post to the channel, edit it, and DM the invoker")
async def post(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.defer(ephemeral=True, thinking=True)
    posted = await interaction.channel.send(text, file=discord.File(io.BytesIO(b"first"), filename="v1.txt"))
    # Editing with the existing attachment plus a new file keeps both.
    await posted.edit(
        content=f"{text} (edited)",
        attachments=[*posted.attachments, discord.File(io.BytesIO(b"second"), filename="v2.txt")],
    )
    dm = await interaction.user.send("your stems are ready")
    await interaction.edit_original_response(content=f"posted {posted.id}, dm {dm.channel.id}")


@app_commands.command(name="late", description="Answer after `delay` seconds, whatever Discord's deadline")
async def late(interaction: discord.Interaction, delay: float) -> None:
    await asyncio.sleep(delay)
    try:
        await interaction.response.send_message("finally")
    except discord.HTTPException as exc:
        interaction.client.refusals.append(exc)


@app_commands.command(name="blob", description="Defer, then send a file of `size` bytes, then post it in the channel")
async def blob(interaction: discord.Interaction, size: int) -> None:
    await interaction.response.defer(thinking=True)
    for send in (interaction.followup.send, interaction.channel.send):
        try:
            await send(content="blob", file=discord.File(io.BytesIO(b"x" * size), filename="blob.bin"))
        except discord.HTTPException as exc:
            interaction.client.refusals.append(exc)


@app_commands.context_menu(name="Count words")
async def count_words(interaction: discord.Interaction, message: discord.Message) -> None:
    await interaction.response.send_message(f"{len(message.content.split())} words", ephemeral=True)


class FixtureBot(commands.Bot):
    """A bot with one command of each kind the fake must carry; records command errors."""

    def __init__(self) -> None:
        # READY carries no guilds; a short guild_ready_timeout makes the bot ready at once.
        super().__init__(command_prefix="!", intents=discord.Intents.none(), guild_ready_timeout=0.1)
        self.errors: list[BaseException] = []
        self.refusals: list[discord.HTTPException] = []  # what the fake refused, as Discord would
        self.tree.error(self._record_error)

    async def _record_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        self.errors.append(error)

    async def setup_hook(self) -> None:
        for command in (echo, retract, size, button, post, late, blob, count_words):
            self.tree.add_command(command)
        await self.tree.sync()


@pytest_asyncio.fixture
async def fake():
    async with FakeDiscord() as server:
        yield server


@pytest_asyncio.fixture
async def bot(fake: FakeDiscord):
    client = FixtureBot()
    async with fake.running(client):
        yield client
    assert client.errors == []
    assert fake.unhandled_requests == []


async def test_bot_logs_in_syncs_commands_and_identifies(fake: FakeDiscord, bot: FixtureBot) -> None:
    assert fake.identifies[0]["token"] == "fake-token"
    assert bot.user is not None and bot.user.id == fake.application_id
    assert {c["name"] for c in fake.commands} == {"echo", "retract", "size", "button", "post", "late", "blob",
                                                "Count words"}
    assert all(int(c["id"]) > 0 for c in fake.commands)
    # discord.py asks for a compressed stream; the fake honours it.
    assert "compress=zlib-stream" in fake.gateway_urls[0] or "compress=zstd-stream" in fake.gateway_urls[0]


async def test_deferred_echo_replaces_thinking_message_with_file(fake: FakeDiscord, bot: FixtureBot) -> None:
    interaction = await fake.send_slash_command("echo", [string_option("text", "hello stems")])

    [reply] = await fake.wait_for_messages(interaction, 1)

    assert interaction.callback_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE
    assert reply.id == interaction.original_message_id
    assert reply.content == "hello stems"
    assert reply.attachment_named("echo.txt").data == b"hello stems"
    [followup_request] = fake.requests_matching("POST", r"/webhooks/\d+/[^/]+")
    assert followup_request.status == 200
    assert [f.filename for f in followup_request.files] == ["echo.txt"]
    assert followup_request.files[0].data == b"hello stems"


async def test_followup_after_the_placeholder_was_deleted_is_a_message_of_its_own(
    fake: FakeDiscord, bot: FixtureBot
) -> None:
    interaction = await fake.send_slash_command("retract", [])

    [answer] = await fake.wait_for_messages(interaction, 1)

    assert answer.id != interaction.original_message_id
    assert answer.content == "only you can see this" and answer.is_ephemeral
    [placeholder] = [m for m in fake.messages_for(interaction, include_deleted=True) if m.deleted]
    assert placeholder.id == interaction.original_message_id


async def test_attachment_option_is_downloaded_from_fake_cdn(fake: FakeDiscord, bot: FixtureBot) -> None:
    audio = bytes(range(256)) * 40
    attachment = fake.add_attachment("song.wav", audio, content_type="audio/wav")

    interaction = await fake.send_slash_command(
        "size", [attachment_option("upload", attachment)], attachment_size_limit=25 * 2**20
    )
    [reply] = await fake.wait_for_messages(interaction, 1)

    assert reply.content == f"song.wav: {len(audio)} bytes, limit {25 * 2**20}"
    [download] = fake.requests_matching("GET", r"/cdn/attachments/.*")
    assert download.status == 200


async def test_message_context_menu_sees_target_message(fake: FakeDiscord, bot: FixtureBot) -> None:
    target = fake.add_user_message("split this song into four stems please")

    interaction = await fake.send_message_command("Count words", target)
    [reply] = await fake.wait_for_messages(interaction, 1)

    assert reply.content == "7 words"
    assert reply.is_ephemeral


async def test_button_click_edits_the_message_it_sits_on(fake: FakeDiscord, bot: FixtureBot) -> None:
    command = await fake.send_slash_command("button")
    [posted] = await fake.wait_for_messages(command, 1)
    [row] = posted.components
    assert row["components"][0]["custom_id"] == "press-button"

    click = await fake.send_component("press-button", posted)
    await fake.wait_for(lambda: click.acknowledged, what="button click answered")

    assert click.original_message_id == posted.id
    assert fake.messages[posted.id].content == "Pressed by tester"
    assert fake.messages[posted.id].components == []


async def test_rate_limited_followup_is_retried_and_delivered_once(fake: FakeDiscord, bot: FixtureBot) -> None:
    fake.fail_next("POST", r"/webhooks/\d+/[^/]+", status=429, retry_after=0.2)

    interaction = await fake.send_slash_command("echo", [string_option("text", "after the limit")])
    [reply] = await fake.wait_for_messages(interaction, 1)

    attempts = fake.requests_matching("POST", r"/webhooks/\d+/[^/]+")
    assert [r.status for r in attempts] == [429, 200]
    assert attempts[1].time - attempts[0].time >= 0.19  # honoured retry_after
    assert reply.content == "after the limit"
    assert len(fake.channel_messages(interaction.channel_id)) == 1


async def test_client_resumes_after_reconnect_and_keeps_handling_commands(
    fake: FakeDiscord, bot: FixtureBot
) -> None:
    resume = await fake.send_reconnect()

    assert resume["session_id"] == fake.session_id
    assert resume["token"] == "fake-token"
    assert len(fake.identifies) == 1  # resumed, not re-identified
    assert fake.gateway_urls[-1].startswith("/resume-gateway")

    interaction = await fake.send_slash_command("echo", [string_option("text", "still here")])
    [reply] = await fake.wait_for_messages(interaction, 1)
    assert reply.content == "still here"


async def test_dm_interaction_is_answered_in_the_dm_channel(fake: FakeDiscord, bot: FixtureBot) -> None:
    interaction = await fake.send_slash_command("echo", [string_option("text", "private")], in_guild=False)
    [reply] = await fake.wait_for_messages(interaction, 1)

    assert interaction.guild_id is None
    assert fake.channels[interaction.channel_id]["type"] == 1
    assert reply.channel_id == interaction.channel_id and reply.guild_id is None
    assert reply.content == "private"


async def test_channel_post_edit_dm_and_original_edit(fake: FakeDiscord, bot: FixtureBot) -> None:
    interaction = await fake.send_slash_command("post", [string_option("text", "stems done")])
    [original] = await fake.wait_for_messages(interaction, 1)

    [posted] = [m for m in fake.channel_messages(fake.channel_id) if m.interaction_id is None]
    assert posted.content == "stems done (edited)"
    assert [(a.filename, a.data) for a in posted.attachments] == [("v1.txt", b"first"), ("v2.txt", b"second")]
    assert posted.attachments[0].content_type == "text/plain"
    dm_channel_id = next(cid for cid, channel in fake.channels.items() if channel["type"] == 1)
    assert [m.content for m in fake.channel_messages(dm_channel_id)] == ["your stems are ready"]
    assert original.content == f"posted {posted.id}, dm {dm_channel_id}"
    assert original.is_ephemeral and not original.is_loading


async def test_http_answers_are_exact_json_and_misses_are_recorded(fake: FakeDiscord) -> None:
    fake.fail_next("GET", "/users/@me", status=500)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{fake.api_url}/users/@me") as failed:
            assert failed.status == 500
        async with session.get(f"{fake.api_url}/users/@me") as user:
            # Anything but exactly "application/json" makes discord.py treat the body as text.
            assert user.headers["Content-Type"] == "application/json"
            assert (await user.json())["id"] == str(fake.application_id)
        async with session.post(f"{fake.api_url}/guilds/1/bans", json={"x": 1}) as missing:
            assert missing.status == 404

    assert [r.status for r in fake.requests] == [500, 200, 404]
    [miss] = fake.unhandled_requests
    assert (miss.method, miss.path, miss.json) == ("POST", "/guilds/1/bans", {"x": 1})


async def test_threads_from_a_message_and_commands_inside_them(fake: FakeDiscord, bot: FixtureBot) -> None:
    starter = await bot.get_partial_messageable(fake.channel_id).send("a remix challenge")
    payload = await bot.http.start_thread_with_message(fake.channel_id, starter.id, name="Remix me",
                                                       auto_archive_duration=10080)
    thread = await bot.fetch_channel(int(payload["id"]))
    assert isinstance(thread, discord.Thread)
    assert (thread.id, thread.parent_id, thread.name) == (starter.id, fake.channel_id, "Remix me")
    await thread.send("the rules", file=discord.File(io.BytesIO(b"stem"), filename="vocals.mp3"))
    other = await bot.http.start_thread_without_message(fake.channel_id, name="Side", auto_archive_duration=60,
                                                        type=11)
    assert [int(t["id"]) for t in fake.threads(fake.channel_id)] == [starter.id, int(other["id"])]

    interaction = await fake.send_slash_command("echo", [string_option("text", "in the thread")],
                                                channel_id=thread.id)
    [reply] = await fake.wait_for_messages(interaction, 1)
    assert [m.content for m in fake.channel_messages(thread.id)] == ["the rules", "in the thread"]
    assert fake.channel_messages(thread.id)[0].attachment_named("vocals.mp3").data == b"stem"
    with pytest.raises(discord.HTTPException):
        await bot.http.start_thread_with_message(fake.channel_id, starter.id, name="Again", auto_archive_duration=60)


async def test_an_answer_after_the_deadline_is_unknown_interaction(fake: FakeDiscord, bot: FixtureBot) -> None:
    fake.callback_deadline_s = 0.3  # Discord's 3 s, shortened to keep the test short

    in_time = await fake.send_slash_command("late", [{"type": 10, "name": "delay", "value": 0.0}])
    [answer] = await fake.wait_for_messages(in_time, 1)
    late_one = await fake.send_slash_command("late", [{"type": 10, "name": "delay", "value": 0.5}])
    await fake.wait_for(lambda: bot.refusals, what="the late answer to be refused")

    assert answer.content == "finally"
    [refused] = bot.refusals
    assert isinstance(refused, discord.NotFound) and refused.code == UNKNOWN_INTERACTION
    assert not late_one.acknowledged and fake.messages_for(late_one) == []


async def test_files_over_the_attachment_size_limit_are_refused(fake: FakeDiscord, bot: FixtureBot) -> None:
    fits = await fake.send_slash_command("blob", [integer_option("size", 1024)], attachment_size_limit=1024)
    [reply] = await fake.wait_for_messages(fits, 1)
    # Over the interaction's limit; the channel post is checked against the server's
    # limit, which is the default 10 MiB here (an interaction's limit does not lower it).
    too_big = await fake.send_slash_command("blob", [integer_option("size", 1025)], attachment_size_limit=1024)
    await fake.wait_for(lambda: len(fake.channel_messages(fake.channel_id)) >= 4, what="the channel post")
    over_server = await fake.send_slash_command("blob", [integer_option("size", 10 * 2**20 + 1)])
    await fake.wait_for(lambda: len(bot.refusals) >= 3, what="the refusals", timeout=15)

    assert reply.attachment_named("blob.bin").size == 1024
    assert [(r.status, r.code) for r in bot.refusals] == [(413, REQUEST_ENTITY_TOO_LARGE)] * 3
    assert fake.messages_for(too_big)[0].is_loading and fake.messages_for(over_server)[0].is_loading
    sizes = [m.attachments[0].size for m in fake.channel_messages(fake.channel_id) if m.attachments]
    assert sizes == [1024, 1024, 1025]
