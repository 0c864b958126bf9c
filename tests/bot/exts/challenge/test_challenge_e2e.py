"""Remix challenges end to end: the real `stembot run` process against the fake Discord,
with deadlines seconds apart. The scheduler acts on them by itself, across a restart."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest
from aiohttp import web

from tests.support.fake_discord import (
    DEFAULT_APP_PERMISSIONS,
    attachment_option,
    boolean_option,
    string_option,
)
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="module")

MANAGE_SERVER = DEFAULT_APP_PERMISSIONS | (1 << 5)


def sub(name, *options):
    return [{"type": 1, "name": name, "options": list(options)}]


async def challenge(fake, name, *options, **context):
    return await fake.send_slash_command("challenge", sub(name, *options), **context)


async def answer(fake, interaction, timeout=15.0) -> str:
    """The ephemeral answer, sent at once or after a deferral."""
    def text():
        if interaction.callback_type == 4:
            return interaction.callback_data
        messages = fake.messages_for(interaction)
        if messages and not messages[0].is_loading:
            return {"content": messages[0].content, "flags": messages[0].flags}
        return None
    data = await fake.wait_for(text, timeout=timeout, what=f"an answer to interaction {interaction.id}")
    assert data["flags"] & 64, f"not ephemeral: {data['content']}"
    return data["content"]


def upload(fake, tmp_path, name, seconds=3.0):
    path = music(tmp_path / name, seconds=seconds, tone=random.uniform(200.0, 900.0))
    return fake.add_attachment(name, path.read_bytes(), content_type="audio/wav")


def in_thread(fake, thread_id, words):
    return [m for m in fake.channel_messages(thread_id) if words in m.content]


def vote_id(message) -> str | None:
    for row in message.components:
        for component in row.get("components", []):
            if component.get("custom_id", "").startswith("stembot:vote:"):
                return component["custom_id"]
    return None


def entry_posts(fake, thread_id):
    return [m for m in fake.channel_messages(thread_id) if vote_id(m)]


async def start(fake, tmp_path, host, title, submissions, voting, *extra):
    track = upload(fake, tmp_path, f"{title}.wav", seconds=4.0)
    interaction = await challenge(fake, "start", string_option("title", title),
                                  string_option("rules", "Keep it under a minute; any genre."),
                                  string_option("submissions", submissions), string_option("voting", voting),
                                  attachment_option("file", track), *extra, user=host, member_permissions=MANAGE_SERVER)
    [announcement] = await fake.wait_for_messages(interaction, 1, timeout=10)
    assert f"Remix challenge: {title}" in announcement.content and not announcement.is_ephemeral
    thread_id = await fake.wait_for(
        lambda: next((int(t["id"]) for t in fake.threads(fake.channel_id) if int(t["id"]) == announcement.id), None),
        what="the challenge's thread")
    assert fake.channels[thread_id]["name"] == title
    # The stems pack arrives in the thread, then submissions open.
    pack = await fake.wait_for(lambda: in_thread(fake, thread_id, "Done"), timeout=60, what="the stems pack")
    assert [a.filename for a in pack[0].attachments][:4] == ["drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3"]
    [opened] = await fake.wait_for(lambda: in_thread(fake, thread_id, "Submissions are open"), timeout=10)
    assert "Rules" in fake.channel_messages(thread_id)[0].content
    # The track's tempo and key, as the stems' message shows them, are announced with it
    # (a tiny random model's stems have some key, if not the song's).
    analysis = re.search(r"· ((?:\d+ BPM · )?[A-G]#? (?:major|minor))", pack[0].content)
    assert analysis is not None, pack[0].content
    assert f"The track: {analysis.group(1)}." in opened.content, opened.content
    return thread_id


async def submit(fake, tmp_path, thread_id, user, name, seconds=3.0):
    entry = upload(fake, tmp_path, name, seconds)
    interaction = await challenge(fake, "submit", attachment_option("file", entry), user=user, channel_id=thread_id)
    return await answer(fake, interaction), entry


async def vote(fake, message, user) -> str:
    click = await fake.send_component(vote_id(message), message, user=user)
    return await answer(fake, click)


def database(bot):
    return sqlite3.connect(bot.data_dir / "stembot.sqlite3")


async def test_a_full_challenge_with_three_members(fake, bot, tmp_path):
    host, alice, bob, carol, dave = (fake.make_user(n) for n in ("host", "alice", "bob", "carol", "dave"))
    began = time.monotonic()

    # Starting one takes Manage Server, or the role an admin names.
    refused = await challenge(fake, "start", string_option("title", "Nope"), string_option("rules", "-"),
                              string_option("submissions", "1d"), string_option("voting", "1d"), user=alice)
    assert "Only members with the Manage Server permission" in await answer(fake, refused)
    role = fake.snowflake()
    admin = await fake.send_slash_command("stembot", sub("challenges", {"type": 8, "name": "role", "value": str(role)}),
                                          member_permissions=MANAGE_SERVER)
    assert f"<@&{role}>" in await answer(fake, admin)
    allowed = await challenge(fake, "start", string_option("title", "Nope"), string_option("rules", "-"),
                              string_option("submissions", "soon"), string_option("voting", "1d"), user=alice,
                              roles=[role])
    assert "can't read 'soon' as a duration" in await answer(fake, allowed)  # past the permission check

    thread_id = await start(fake, tmp_path, host, "Remix Sunday", "20s", "12s")

    # Three members submit; alice replaces hers; a text file is refused.
    text, _ = await submit(fake, tmp_path, thread_id, alice, "alice-v1.wav")
    assert "Your entry `alice-v1.wav` (0:03) is in for **Remix Sunday**" in text
    assert "is in" in (await submit(fake, tmp_path, thread_id, bob, "bob.wav"))[0]
    assert "is in" in (await submit(fake, tmp_path, thread_id, carol, "carol.wav", 2.0))[0]
    text, alice_final = await submit(fake, tmp_path, thread_id, alice, "alice-v2.wav", 4.0)
    assert "Replaced your entry for **Remix Sunday** with `alice-v2.wav` (0:04)" in text
    notes = fake.add_attachment("notes.txt", b"la la la\n" * 50, content_type="text/plain")
    wrong = await challenge(fake, "submit", attachment_option("file", notes), user=dave, channel_id=thread_id)
    assert "isn't an audio file" in await answer(fake, wrong)
    disguised = fake.add_attachment("fake.mp3", b"<html>no</html>" * 100, content_type="audio/mpeg")
    wrong = await challenge(fake, "submit", attachment_option("file", disguised), user=dave, channel_id=thread_id)
    assert "Your entry was refused" in await answer(fake, wrong)
    elsewhere = upload(fake, tmp_path, "elsewhere.wav")
    elsewhere = {**elsewhere, "url": "https://files.example.com/elsewhere.wav"}  # not the CDN's origin
    wrong = await challenge(fake, "submit", attachment_option("file", elsewhere), user=dave, channel_id=thread_id,
                            attachments=[elsewhere])
    assert "can't be fetched: attachments are only fetched from Discord's CDN" in await answer(fake, wrong)

    # Voting opens by itself at the deadline: one post per entry, with its file and a Vote button.
    await fake.wait_for(lambda: in_thread(fake, thread_id, "Voting is open"), timeout=30, what="voting to open")
    posts = await fake.wait_for(lambda: len(entry_posts(fake, thread_id)) == 3 and entry_posts(fake, thread_id),
                                timeout=10, what="three entry posts")
    by_author = {}
    for post, user, name in zip(posts, (bob, carol, alice), ("bob.wav", "carol.wav", "alice-v2.wav"), strict=True):
        assert f"by <@{user['id']}>" in post.content and name in post.content
        assert [a.filename for a in post.attachments] == [name]
        by_author[user["username"]] = post
    assert by_author["alice"].attachments[0].data == fake.attachments[int(alice_final["id"])].data
    assert "Entry 1" in by_author["bob"].content and "Entry 3" in by_author["alice"].content

    late = await submit(fake, tmp_path, thread_id, dave, "dave.wav")
    assert "Submissions are closed for **Remix Sunday**" in late[0]

    # Votes: not for your own entry; a second vote replaces the first.
    assert "can't vote for your own entry" in await vote(fake, by_author["bob"], bob)
    assert "Vote recorded for **Entry 1**" in await vote(fake, by_author["bob"], alice)
    assert "Vote recorded for **Entry 3**" in await vote(fake, by_author["alice"], carol)
    assert "Vote changed from **Entry 3** to **Entry 1**" in await vote(fake, by_author["bob"], carol)
    assert "already on **Entry 1**" in await vote(fake, by_author["bob"], carol)
    assert "Vote recorded" in await vote(fake, by_author["alice"], bob)
    assert "Vote recorded" in await vote(fake, by_author["bob"], host)
    status = await challenge(fake, "status", user=carol, channel_id=thread_id)
    shown = await answer(fake, status)
    assert "voting" in shown and "Votes so far: 4." in shown and "Your vote: Entry 1." in shown

    # The results post by themselves at the voting deadline, ranked, authors revealed, once.
    [results] = await fake.wait_for(lambda: in_thread(fake, thread_id, "Results"), timeout=30, what="the results")
    lines = results.content.splitlines()
    assert f"<@{bob['id']}>" in lines[1] and "**3 votes**" in lines[1]
    assert f"<@{alice['id']}>" in lines[2] and "**1 vote**" in lines[2]
    assert f"<@{carol['id']}>" in lines[3] and "**0 votes**" in lines[3]
    assert "4 members voted" in results.content
    assert "Voting is closed" in await vote(fake, by_author["carol"], dave)
    await asyncio.sleep(2.5)  # a scheduler round or two later: still one results post
    assert len(in_thread(fake, thread_id, "Results")) == 1 and len(entry_posts(fake, thread_id)) == 3

    listed = await answer(fake, await challenge(fake, "list", user=dave))
    assert "**Remix Sunday** — closed" in listed
    shown = await answer(fake, await challenge(fake, "status", user=dave))
    assert "closed" in shown and "**3 votes**" in shown

    # The split ran as a bulk job on the host's quota; the entries' files are gone with the challenge.
    rows = database(bot).execute("SELECT user_id, priority, state, quota_state FROM jobs WHERE channel_id = ?",
                                 (thread_id,)).fetchall()
    assert rows == [(int(host["id"]), 10, "done", "charged")]
    assert not list((bot.data_dir / "jobs" / "challenges").glob("*/entries/*"))
    assert time.monotonic() - began < 75


async def test_results_post_once_after_a_restart_between_the_deadlines(fake, bot, tmp_path):
    host, alice, bob = (fake.make_user(n) for n in ("host2", "ann", "ben"))
    thread_id = await start(fake, tmp_path, host, "Night Shift", "12s", "10s", boolean_option("anonymous", True))
    assert "Entries are anonymous" in fake.channel_messages(thread_id)[0].content
    await submit(fake, tmp_path, thread_id, alice, "ann-remix.wav")
    await submit(fake, tmp_path, thread_id, bob, "ben-remix.wav")
    posts = await fake.wait_for(lambda: len(entry_posts(fake, thread_id)) == 2 and entry_posts(fake, thread_id),
                                timeout=30, what="the entries")
    for number, post in enumerate(posts, start=1):
        # Anonymous: a number, and a file name that gives nobody away.
        assert post.content.startswith(f"**Entry {number}**") and "<@" not in post.content
        assert [a.filename for a in post.attachments] == [f"entry-{number}.wav"]
    ann_post = next(p for p in posts if p.attachments[0].data == fake.attachments[
        int(next(a for a in fake.attachments.values() if a.filename == "ann-remix.wav").id)].data)
    assert "Vote recorded" in await vote(fake, ann_post, bob)

    await bot.stop()
    deadline = database(bot).execute("SELECT vote_deadline FROM challenges WHERE thread_id = ?",
                                     (thread_id,)).fetchone()[0]
    deadline = datetime.fromisoformat(deadline).replace(tzinfo=UTC)
    await asyncio.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()) + 1.0)
    assert not in_thread(fake, thread_id, "Results"), "nobody posts while the bot is down"

    await bot.start()
    [results] = await fake.wait_for(lambda: in_thread(fake, thread_id, "Results"), timeout=20,
                                    what="the results after the restart")
    lines = results.content.splitlines()
    assert f"<@{alice['id']}>" in lines[1] and "ann-remix.wav" in lines[1] and "**1 vote**" in lines[1]
    assert f"<@{bob['id']}>" in lines[2] and "**0 votes**" in lines[2]
    # The Vote buttons outlive the restart (and now say the vote is over).
    assert "Voting is closed" in await vote(fake, ann_post, host)
    await asyncio.sleep(2.5)
    assert len(in_thread(fake, thread_id, "Results")) == 1
    assert database(bot).execute("SELECT state FROM challenges WHERE thread_id = ?",
                                 (thread_id,)).fetchone() == ("closed",)

    # The host (or a server manager, nobody else) can end a challenge before the vote: it is cancelled.
    track = upload(fake, tmp_path, "scrapped.wav", seconds=4.0)
    scrapped = await challenge(fake, "start", string_option("title", "Scrapped"), string_option("rules", "-"),
                               string_option("submissions", "1d"), string_option("voting", "1d"),
                               attachment_option("file", track), user=host, member_permissions=MANAGE_SERVER)
    [announcement] = await fake.wait_for_messages(scrapped, 1, timeout=10)
    await fake.wait_for(lambda: announcement.id in fake.channels and fake.channel_messages(announcement.id))
    refused = await challenge(fake, "end", user=alice, channel_id=announcement.id)
    assert "Only the host or a member with Manage Server" in await answer(fake, refused)
    ended = await challenge(fake, "end", user=host, channel_id=announcement.id)
    assert "**Scrapped** is cancelled" in await answer(fake, ended)
    assert in_thread(fake, announcement.id, "Challenge cancelled:** ended by")
    assert database(bot).execute("SELECT state FROM challenges WHERE thread_id = ?",
                                 (announcement.id,)).fetchone() == ("cancelled",)


@asynccontextmanager
async def held_song_server(path):
    """A web server on loopback that sends the first KiB of `path`, then holds the rest
    until the returned event is set: a remix whose download takes as long as a test needs."""
    data = path.read_bytes()
    release = asyncio.Event()

    async def song(request):
        response = web.StreamResponse(headers={"Content-Type": "audio/wav", "Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[:1024])
        await release.wait()
        await response.write(data[1024:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{name}", song)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/{path.name}", release
    finally:
        release.set()
        await runner.cleanup()


async def test_one_submission_at_a_time_and_a_few_per_member(fake, bot, tmp_path):
    host, erin = fake.make_user("host3"), fake.make_user("erin")
    thread_id = await start(fake, tmp_path, host, "Slow Lane", "1h", "1h")
    remix = music(tmp_path / "erin-slow.wav", seconds=3.0, tone=440.0)
    async with held_song_server(remix) as (url, release):
        slow = await challenge(fake, "submit", string_option("url", url), user=erin, channel_id=thread_id)
        await fake.wait_for(lambda: slow.acknowledged, timeout=10, what="the first submission to be taken")
        # While the first is downloaded and probed, a second one from erin is refused at once ...
        again, _ = await submit(fake, tmp_path, thread_id, erin, "erin-fast.wav")
        assert again == ("Your previous entry is still being checked; wait for its answer before you send "
                         "another.")
        # ... while another member's goes through.
        assert "is in" in (await submit(fake, tmp_path, thread_id, host, "host.wav"))[0]
        release.set()
        assert "Your entry `erin-slow.wav` (0:03) is in for **Slow Lane**" in await answer(fake, slow)
    entry = database(bot).execute("SELECT original_name, replaced FROM challenge_entries WHERE user_id = ?",
                                  (int(erin["id"]),)).fetchall()
    assert entry == [("erin-slow.wav", 0)]

    # Five submissions per member and challenge (STEMBOT_CHALLENGE_SUBMISSIONS_PER_MEMBER's default).
    for k in range(4):
        assert "Replaced your entry" in (await submit(fake, tmp_path, thread_id, erin, f"erin-{k}.wav"))[0]
    text, _ = await submit(fake, tmp_path, thread_id, erin, "erin-6.wav")
    assert text == "You have sent 5 entries to **Slow Lane**, the most allowed; your current entry stays."
    assert database(bot).execute("SELECT original_name, replaced FROM challenge_entries WHERE user_id = ?",
                                 (int(erin["id"]),)).fetchall() == [("erin-3.wav", 4)]
    ended = await challenge(fake, "end", user=host, channel_id=thread_id)
    assert "**Slow Lane** is cancelled" in await answer(fake, ended)
