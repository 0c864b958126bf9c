"""Songs given as links: fetched safely, refused quickly and privately when they can't be used."""

from __future__ import annotations

import random

import pytest

from tests.bot.helpers import MANAGE_SERVER, final_message, private_answer
from tests.support.fake_discord import string_option
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="module")




def hosted_song(fake, tmp_path, name="linked.wav"):
    """A song on a loopback web server (the fake's CDN), which the bot's links may reach:
    the tests' bot allows 127.0.0.0/8 (STEMBOT_FETCH_ALLOWED_NETWORKS), as an operator would."""
    path = music(tmp_path / name, seconds=4.0, tone=random.uniform(200.0, 900.0))
    return fake.add_attachment(name, path.read_bytes(), content_type="audio/wav")["url"]


async def test_a_direct_link_is_split(fake, bot, tmp_path):
    url = hosted_song(fake, tmp_path)
    job = await fake.send_slash_command("split", [string_option("url", url)])
    result = await final_message(fake, job)
    assert "Done" in result.content and "`linked.wav`" in result.content and len(result.attachments) == 5


@pytest.mark.parametrize("url,reason", [
    ("http://169.254.169.254/latest/meta-data.mp3", "private or reserved network address"),
    ("http://10.0.0.7/song.mp3", "private or reserved network address"),
    ("file:///etc/passwd", "only http and https"),
    ("http://2130706433/song.mp3", "can't be used"),
    ("gopher://example.com/song.mp3", "only http and https"),
    ("https://user:pw@example.com/song.mp3", "can't be used"),
])
async def test_hostile_links_are_refused_privately_at_once(fake, bot, url, reason):
    job = await fake.send_slash_command("split", [string_option("url", url)])
    text = await private_answer(fake, job, timeout=3.0)  # judged without the network: at once
    assert "That link can't be used" in text and reason in text
    assert not any(m for m in fake.messages_for(job) if not m.is_ephemeral)


async def test_streaming_sites_are_off_until_an_admin_allows_them(fake, bot):
    job = await fake.send_slash_command("split", [string_option("url", "https://www.youtube.com/watch?v=dQw4w9WgXcQ")])
    assert "not enabled on this server" in await private_answer(fake, job)


async def test_a_link_that_cannot_be_fetched_fails_with_a_reason(fake, bot):
    missing = f"{fake.base_url}/cdn/attachments/1/missing.mp3"
    job = await fake.send_slash_command("split", [string_option("url", missing)])
    result = await final_message(fake, job)
    assert "Couldn't split" in result.content and "404" in result.content


async def test_a_web_page_behind_a_link_is_not_audio(fake, bot):
    page = fake.add_attachment("song.mp3", b"<!doctype html><html><body>hi</body></html>" * 100,
                               content_type="audio/mpeg")["url"]
    job = await fake.send_slash_command("split", [string_option("url", page)])
    result = await final_message(fake, job)
    assert "Couldn't split" in result.content and "web page" in result.content


async def test_admins_can_forbid_links(fake, bot, tmp_path):
    admin = await fake.send_slash_command(
        "stembot", [{"type": 1, "name": "links", "options": [{"type": 5, "name": "allowed", "value": False}]}],
        member_permissions=MANAGE_SERVER)
    assert "Links are now not allowed" in await private_answer(fake, admin)
    job = await fake.send_slash_command("split", [string_option("url", hosted_song(fake, tmp_path, "x.wav"))])
    assert "Links are not allowed on this server" in await private_answer(fake, job)
