"""End to end: the bot keeps disk space free. The operator's floor is set above what the
disk has (as an operator would on a nearly full disk): new songs are refused at once,
privately, and nobody is charged; a track too long to split in the space left is
refused after its length is known."""

from __future__ import annotations

import shutil

import pytest

from tests.bot.conftest import BotProcess
from tests.bot.helpers import final_message, private_answer, upload
from tests.support.fake_discord import attachment_option
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="module")

MB = 1024 * 1024


async def test_below_the_free_space_floor_new_songs_are_refused_privately(fake, model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    floor_mb = shutil.disk_usage(data).free // MB + 1024  # more than the disk has
    bot = BotProcess(fake, data, model_dir, STEMBOT_MIN_FREE_DISK_MB=str(floor_mb))
    await bot.start()
    try:
        interaction = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path))])
        answer = await private_answer(fake, interaction)
        assert "short of disk space" in answer
        assert all(m.is_ephemeral for m in fake.messages_for(interaction))  # nothing public, no job
        assert "refusing a new job" in bot.log.read_text(errors="replace")
    finally:
        await bot.stop()


async def test_a_track_too_long_for_the_space_left_is_refused_once_its_length_is_known(fake, model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # Room for the floor plus ~1 GB, so that what other tests write to the same disk meanwhile
    # does not reach the floor: a 19-minute track needs about 2.7 GB to split.
    floor_mb = shutil.disk_usage(data).free // MB - 1024
    bot = BotProcess(fake, data, model_dir, STEMBOT_MIN_FREE_DISK_MB=str(floor_mb))
    await bot.start()
    try:
        long_song = music(tmp_path / "long.mp3", seconds=1140.0, rate=22050, channels=1, extra=("-b:a", "32k"))
        song = fake.add_attachment("long.mp3", long_song.read_bytes(), content_type="audio/mpeg")
        interaction = await fake.send_slash_command("split", [attachment_option("file", song)])
        result = await final_message(fake, interaction)
        assert "Couldn't split" in result.content and "short of disk space for a track this long" in result.content
        assert "refusing a 1140 s track" in bot.log.read_text(errors="replace")
    finally:
        await bot.stop()
