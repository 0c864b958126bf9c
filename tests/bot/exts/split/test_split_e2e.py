"""End to end: the real `stembot run` process and discord.py client against the fake Discord."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile
from aiohttp import web

from bench.tempo_key_accuracy import RATE, drum_loop, progression
from core.media.audio import probe
from tests.bot.helpers import final_message, private_answer, upload
from tests.support.deployment import compose_healthcheck, dockerfile_healthcheck
from tests.support.fake_discord import attachment_option, integer_option, string_option

pytestmark = pytest.mark.asyncio(loop_scope="module")



def status_message(fake, interaction):
    messages = fake.messages_for(interaction)
    return messages[0] if messages else None


def cancel_custom_id(message) -> str | None:
    for row in message.components:
        for component in row.get("components", []):
            if component.get("custom_id", "").startswith("stembot:cancel:"):
                return component["custom_id"]
    return None


def link_buttons(message) -> dict[str, str]:
    return {c["label"]: c["url"] for row in message.components for c in row.get("components", []) if c.get("url")}


async def test_split_attachment_delivers_every_stem_with_a_preview(fake, bot, tmp_path):
    att = upload(fake, tmp_path)
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
    result = await final_message(fake, interaction)
    assert "Done" in result.content and "4 stems" in result.content and "MP3 at 320 kbps" in result.content
    names = [a.filename for a in result.attachments]
    assert names == ["drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3", "preview.png"]
    for attachment in result.attachments[:4]:
        path = tmp_path / attachment.filename
        path.write_bytes(attachment.data)
        info = probe(path)
        assert info.codec == "mp3" and info.duration_s == pytest.approx(5.0, abs=0.15)
    assert result.attachment_named("preview.png").data.startswith(b"\x89PNG")
    assert cancel_custom_id(result) is None, "the Cancel button goes away with the result"
    # (That the status message shows the queue and the stages first: a test of its own below.)
    assert not result.is_ephemeral


async def test_an_attachment_is_fetched_only_from_the_discord_cdn_origin(fake, bot, tmp_path):
    """The bot's STEMBOT_DISCORD_CDN_URL is the fake's origin. An attachment whose URL is on any
    other origin is refused at once, privately, and never fetched: even one that serves the song
    on loopback, which this bot's links may reach (127.0.0.0/8 is an allowed network here)."""
    song = upload(fake, tmp_path, "elsewhere.wav")
    requests: list[str] = []

    async def serve(request):
        requests.append(request.path)
        return web.Response(body=fake.attachments[int(song["id"])].data, content_type="audio/wav")

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    other = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        for url in (f"{other}/cdn/attachments/{song['id']}/elsewhere.wav",
                    "https://media.example.com/attachments/1/2/elsewhere.wav"):
            elsewhere = {**song, "url": url, "proxy_url": url}
            job = await fake.send_slash_command("split", [attachment_option("file", elsewhere)],
                                                attachments=[elsewhere])
            text = await private_answer(fake, job, timeout=3.0)
            assert "`elsewhere.wav` can't be fetched" in text and "only fetched from Discord's CDN" in text, text
            assert not any(m for m in fake.messages_for(job) if not m.is_ephemeral)
    finally:
        await runner.cleanup()
    assert requests == []  # (attachments on the configured origin are split by the tests above and below)


async def test_status_message_shows_the_queue_and_the_stages_before_the_result(fake, bot, tmp_path):
    # Timing targets (queue position within 1 s) are measured by bench/, not asserted here.
    running = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "r.wav", 30.0))])
    await fake.wait_for(lambda: any("Separating" in m.content for m in fake.messages_for(running)), timeout=30)
    waiting = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "w.wav"))])
    status = await fake.wait_for(lambda: (m := status_message(fake, waiting)) and "Next in line" in m.content and m,
                                 timeout=10, what="the waiting job's queue position")
    assert cancel_custom_id(status)
    first, second = await final_message(fake, running), await final_message(fake, waiting)
    shown = [edit.get("content") or "" for edit in first.edits]
    assert any("Separating" in text and "%" in text for text in shown), shown
    assert status.id == second.id and "Done" in second.content


async def test_the_same_song_again_is_answered_from_the_cache(fake, bot, tmp_path):
    # A song of known tempo and key, through a model whose stems keep them (a random tiny
    # model's stems would not): the result shows both, and so does the cache's answer.
    chords, bass = progression(9, True, 100, "saw", seconds=10)
    song = chords + bass + 0.7 * drum_loop(100, seconds=10)
    soundfile.write(tmp_path / "again.wav", np.stack([song, song], axis=1), RATE)
    att = fake.add_attachment("again.wav", (tmp_path / "again.wav").read_bytes(), content_type="audio/wav")
    mixstems = string_option("model", "mixstems")
    first = await final_message(fake, await fake.send_slash_command("split", [attachment_option("file", att),
                                                                              mixstems]))
    again = fake.add_attachment("again-renamed.wav", fake.attachments[int(att["id"])].data,
                                content_type="audio/wav")
    second = await final_message(fake, await fake.send_slash_command("split", [attachment_option("file", again),
                                                                               mixstems]))
    assert "from the cache" in second.content and "from the cache" not in first.content
    for name in ("drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3"):
        assert second.attachment_named(name).data == first.attachment_named(name).data
    for result in (first, second):
        assert "· 100 BPM · A minor ·" in result.content, result.content


async def test_split_at_80_percent_and_a_mix_without_the_drums_have_the_right_length(fake, bot, tmp_path):
    """/split tempo:80 renders every stem 1.25 times as long (rubberband, on the host); /mix
    delivers one file of the other stems, as long as the song at its tempo; a malformed
    mix is refused privately before anything is queued."""
    slow = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "slow.wav")),
                                                   integer_option("tempo", 80), integer_option("transpose", 2)])
    mixed = await fake.send_slash_command("mix", [attachment_option("file", upload(fake, tmp_path, "mix.wav")),
                                                  string_option("without", "drums"),
                                                  string_option("volumes", "vocals=50"), integer_option("tempo", 125)])
    wrong = await fake.send_slash_command("mix", [attachment_option("file", upload(fake, tmp_path, "no.wav")),
                                                  string_option("volumes", "drums=loud")])
    assert "written like" in await private_answer(fake, wrong)
    slow_result, mix_result = await final_message(fake, slow), await final_message(fake, mixed)
    assert "4 stems · at 80% speed, +2 semitones" in slow_result.content, slow_result.content
    assert [a.filename for a in slow_result.attachments] == ["drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3",
                                                             "preview.png"]
    for attachment in slow_result.attachments[:4]:
        (tmp_path / attachment.filename).write_bytes(attachment.data)
        assert probe(tmp_path / attachment.filename).duration_s == pytest.approx(5.0 / 0.8, abs=0.15)
    assert "a mix of bass, other, vocals 50% · at 125% speed" in mix_result.content, mix_result.content
    assert [a.filename for a in mix_result.attachments] == ["mix.mp3", "preview.png"]
    (tmp_path / "mix.mp3").write_bytes(mix_result.attachment_named("mix.mp3").data)
    assert probe(tmp_path / "mix.mp3").duration_s == pytest.approx(5.0 / 1.25, abs=0.15)
    assert not [m for m in fake.messages_for(wrong) if not m.is_ephemeral]


async def test_karaoke(fake, bot, tmp_path):
    att = upload(fake, tmp_path, "duet.wav")
    interaction = await fake.send_slash_command("karaoke", [attachment_option("file", att),
                                                            string_option("format", "flac")])
    result = await final_message(fake, interaction)
    assert [a.filename for a in result.attachments] == ["vocals.flac", "no_vocals.flac", "preview.png"]


async def test_karaoke_in_the_singers_key(fake, bot, tmp_path):
    """/karaoke transpose:-3 renders the backing track and the vocals 3 semitones down, at the
    song's length; a transpose out of range is refused privately."""
    interaction = await fake.send_slash_command("karaoke", [attachment_option("file", upload(fake, tmp_path, "k.wav")),
                                                            integer_option("transpose", -3)])
    wrong = await fake.send_slash_command("karaoke", [attachment_option("file", upload(fake, tmp_path, "x.wav")),
                                                      integer_option("transpose", 13)])
    assert "12" in await private_answer(fake, wrong)
    result = await final_message(fake, interaction)
    assert "2 stems · -3 semitones" in result.content, result.content
    (tmp_path / "no_vocals.mp3").write_bytes(result.attachment_named("no_vocals.mp3").data)
    assert probe(tmp_path / "no_vocals.mp3").duration_s == pytest.approx(5.0, abs=0.15)
    assert not [m for m in fake.messages_for(wrong) if not m.is_ephemeral]


async def test_context_menu_on_a_message_with_a_song(fake, bot, tmp_path):
    att = upload(fake, tmp_path, "jam.wav")
    posted = fake.add_user_message("check out my jam", attachments=[att])
    interaction = await fake.send_message_command("Split stems", posted)
    result = await final_message(fake, interaction)
    assert "Done" in result.content and len(result.attachments) == 5


async def test_context_menu_without_audio_is_refused_ephemerally(fake, bot):
    posted = fake.add_user_message("just words")
    interaction = await fake.send_message_command("Split stems", posted)
    await fake.wait_for(lambda: interaction.acknowledged, timeout=3)
    assert interaction.callback_type == 4
    assert interaction.callback_data["flags"] & 64
    assert "no audio or video attachment" in interaction.callback_data["content"]


async def test_non_audio_attachment_gets_an_ephemeral_error_within_3_s(fake, bot):
    att = fake.add_attachment("notes.txt", b"not a song\n" * 100, content_type="text/plain")
    sent = time.monotonic()
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
    await fake.wait_for(lambda: interaction.acknowledged, timeout=3, what="an answer within 3 s")
    assert time.monotonic() - sent < 3
    assert interaction.callback_type == 4 and interaction.callback_data["flags"] & 64
    assert "isn't an audio or video file" in interaction.callback_data["content"]


async def test_disguised_non_audio_fails_with_a_reason_and_no_stack_trace(fake, bot):
    att = fake.add_attachment("song.mp3", b"<html>not really</html>" * 200, content_type="audio/mpeg")
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
    result = await final_message(fake, interaction)
    assert "Couldn't split" in result.content and "song.mp3" in result.content
    assert "Traceback" not in result.content and not result.attachments
    assert cancel_custom_id(result) is None


async def test_result_too_large_for_the_limit_becomes_smaller_files(fake, bot, tmp_path):
    att = upload(fake, tmp_path, "long.wav", seconds=8.0)
    limit = 200 * 1024  # 320 kbps for 8 s is 320 kB per stem
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)],
                                                attachment_size_limit=limit)
    result = await final_message(fake, interaction)
    assert "Done" in result.content and "320 kbps" not in result.content
    assert "too large" in result.content
    stems = [a for a in result.attachments if a.filename.endswith((".mp3", ".opus"))]
    assert len(stems) == 4 and all(a.size <= limit for a in stems)


async def test_lossless_too_large_becomes_links_that_download_the_right_bytes(fake, bot, tmp_path):
    att = upload(fake, tmp_path, "big.wav", seconds=5.0)
    interaction = await fake.send_slash_command("split", [attachment_option("file", att),
                                                          string_option("format", "wav")],
                                                attachment_size_limit=100 * 1024)
    result = await final_message(fake, interaction)
    links = link_buttons(result)
    assert sorted(links) == ["Open player", "bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    assert "download links (valid 24 h)" in result.content
    job_id = re.search(r"/dl/(\d+)/", links["vocals.wav"]).group(1)
    on_disk = (bot.data_dir / "jobs" / job_id / "stems" / "vocals.wav").read_bytes()
    async with aiohttp.ClientSession() as session:
        async with session.get(links["vocals.wav"]) as response:
            assert response.status == 200
            assert await response.read() == on_disk
        tampered = links["vocals.wav"].replace("vocals.wav", "drums.wav")
        async with session.get(tampered) as response:
            assert response.status == 403


async def test_cancel_button_while_separating(fake, bot, tmp_path):
    att = upload(fake, tmp_path, "epic.wav", seconds=90.0)
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
    status = await fake.wait_for(
        lambda: (m := status_message(fake, interaction)) and "Separating" in m.content and m, timeout=60,
        what="the separating stage")
    clicked = time.monotonic()
    click = await fake.send_component(cancel_custom_id(status), status)
    await fake.wait_for(lambda: click.acknowledged, timeout=3)
    assert "Cancelled" in click.callback_data["content"] and click.callback_data["flags"] & 64
    result = await final_message(fake, interaction)
    assert time.monotonic() - clicked < 10
    assert "Cancelled" in result.content and not result.attachments and cancel_custom_id(result) is None


async def test_someone_else_cannot_cancel_my_job(fake, bot, tmp_path):
    att = upload(fake, tmp_path, "mine.wav", seconds=30.0)
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
    status = await fake.wait_for(lambda: (m := status_message(fake, interaction)) and cancel_custom_id(m) and m,
                                 timeout=10)
    stranger = fake.make_user("stranger")
    click = await fake.send_component(cancel_custom_id(status), status, user=stranger)
    await fake.wait_for(lambda: click.acknowledged, timeout=3)
    assert "Only the person who asked" in click.callback_data["content"]
    result = await final_message(fake, interaction)
    assert "Done" in result.content


async def test_two_users_at_once_both_get_their_stems(fake, bot, tmp_path):
    alice, bob = fake.make_user("alice"), fake.make_user("bob")
    first = upload(fake, tmp_path, "a.wav", tone=330.0)
    second = upload(fake, tmp_path, "b.wav", seconds=40.0, tone=550.0)  # still running when bob asks /queue
    one, two = await asyncio.gather(
        fake.send_slash_command("split", [attachment_option("file", first)], user=alice),
        fake.send_slash_command("karaoke", [attachment_option("file", second)], user=bob),
    )
    await fake.wait_for(lambda: (m := status_message(fake, two)) and cancel_custom_id(m), timeout=10,
                        what="bob's job queued")
    queue = await fake.send_slash_command("queue", user=bob)
    await fake.wait_for(lambda: queue.acknowledged, timeout=3)
    assert "b.wav" in queue.callback_data["content"] and "a.wav" not in queue.callback_data["content"]
    results = await asyncio.gather(final_message(fake, one), final_message(fake, two))
    assert "a.wav" in results[0].content and len(results[0].attachments) == 5
    assert "b.wav" in results[1].content and len(results[1].attachments) == 3


async def test_rate_limits_are_survived(fake, bot, tmp_path):
    fake.fail_next("PATCH", r"/webhooks/\d+/[^/]+/messages/.*", status=429, retry_after=0.3, times=3)
    att = upload(fake, tmp_path, "ratelimited.wav")
    interaction = await fake.send_slash_command("split", [attachment_option("file", att)])
    result = await final_message(fake, interaction)
    assert "Done" in result.content and len(result.attachments) == 5
    statuses = [r.status for r in fake.requests_matching("PATCH", r"/webhooks/\d+/[^/]+/messages/.*")]
    assert statuses.count(429) == 3


async def test_help(fake, bot):
    help_ = await fake.send_slash_command("help")
    await fake.wait_for(lambda: help_.acknowledged, timeout=3)
    assert "/karaoke" in help_.callback_data["content"] and help_.callback_data["flags"] & 64


async def test_health_and_metrics_only_on_the_operators_listener(fake, bot):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{bot.ops_url}/readyz") as response:
            assert response.status == 200
            checks = await response.json()
        async with session.get(f"{bot.ops_url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        # The public listener (download links) has none of it.
        for path in ("/livez", "/readyz", "/metrics"):
            async with session.get(f"{bot.web_url}{path}") as response:
                assert response.status == 404, path
                assert "stembot_" not in await response.text()
    assert checks == {"ready": True,
                      "checks": {"gateway": True, "database": True, "worker": True, "dispatcher": True,
                                 "deliveries": True}}
    assert re.search(r'stembot_jobs_total\{state="done"\} [1-9]', text), text[:2000]
    # Commands are synced by `stembot sync`, never on start (Discord limits command creation).
    assert not fake.requests_matching("PUT", r"/applications/\d+/(guilds/\d+/)?commands")


async def run_healthcheck(argv: list[str], ops_port: int) -> int:
    """Run a healthcheck command as Docker would in the image (STEMBOT_OPS_PORT from its ENV;
    `python` is the interpreter running these tests)."""
    env = {**os.environ, "STEMBOT_OPS_PORT": str(ops_port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(process.wait(), 30)


async def test_the_images_healthchecks_pass_on_the_operators_listener_only(bot):
    for argv in (compose_healthcheck("bot"), dockerfile_healthcheck("bot")):
        assert await run_healthcheck(argv, bot.ops_port) == 0, argv
        # Pointed at the public listener, it fails: it checks the operators' listener.
        assert await run_healthcheck(argv, bot.web_port) != 0, argv
