"""End to end, embedded mode: no job stays stuck in a running state.

- A database error in the middle of a separation (the bot's own SQLite database loses its
  `jobs` table for a few seconds, renamed away by another connection, as a botched manual
  change or a restore would) costs a progress write or two, not the job: it ends done, the
  user answered once, the slot free.
- A model host that hangs in its forward pass (a model that never returns on true stereo)
  is killed at the job's deadline, set short by settings as an operator could; the job is
  retried, then failed with a clear message, uncharged; the next job runs on the restarted
  host."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest

from core.jobs.runner import TIMED_OUT
from tests.bot.conftest import BotProcess
from tests.bot.exts.split.test_dispatch_faults_e2e import rename_table
from tests.bot.helpers import FINAL_WORDS, final_message, model_hosts, upload
from tests.support import models as tiny
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import ffmpeg

pytestmark = pytest.mark.asyncio(loop_scope="function")

# The bot's model host loads the faulty models by their class, from this repository's tests.
REPOSITORY = str(Path(__file__).resolve().parents[4])


@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory) -> Path:
    from tests.support.faulty_models import HangsOnTrueStereo, SlowOnSound

    folder = tmp_path_factory.mktemp("faulty")
    tiny.save_th(tiny.tiny_htdemucs(seed=0, klass=SlowOnSound), folder, "tinyslow")
    tiny.save_th(tiny.tiny_htdemucs(seed=0, klass=HangsOnTrueStereo), folder, "tinyhang")
    return folder


def rows(database: Path) -> list[tuple]:
    with sqlite3.connect(database, timeout=30) as db:
        return db.execute("SELECT id, state, attempts, slot_state, quota_state, error_kind FROM jobs "
                          "ORDER BY id").fetchall()


def answers(fake: FakeDiscord, interaction, name: str) -> list:
    """Every message that tells the user how the job on file `name` ended: in its reply, or
    in the channel (the fallback)."""
    seen = {m.id: m for m in fake.messages_for(interaction)}
    seen.update({m.id: m for m in fake.channel_messages(fake.channel_id)})
    return [m for m in seen.values() if name in m.content and any(w in m.content for w in FINAL_WORDS)]


async def test_a_database_error_during_separation_costs_no_job(tmp_path, faulty_dir):
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "data", faulty_dir, STEMBOT_MODEL="tinyslow", STEMBOT_JOB_STALE_S="60",
                         PYTHONPATH=REPOSITORY)
        database = tmp_path / "data" / "stembot.sqlite3"
        try:
            await bot.start()
            interaction = await fake.send_slash_command(
                "split", [attachment_option("file", upload(fake, tmp_path, seconds=20.0))])
            await fake.wait_for(lambda: any("Separating" in m.content for m in fake.messages_for(interaction)),
                                timeout=60, what="separation to start")
            # Forward passes take 1.5 s each and progress is written every 2 s: several writes
            # fail while the table is away.
            rename_table(database, "jobs", "jobs_away")
            try:
                await asyncio.sleep(5.0)
            finally:
                rename_table(database, "jobs_away", "jobs")
            result = await final_message(fake, interaction, timeout=120)
            assert "Done" in result.content, result.content
            await asyncio.sleep(1.0)  # time for a second answer, were one coming
            assert len(answers(fake, interaction, "song.wav")) == 1
            ((_, state, attempts, slot, quota, _),) = rows(database)
            assert (state, attempts, slot, quota) == ("done", 1, "released", "charged")
            assert "progress not written" in bot.log.read_text(errors="replace")
        finally:
            await bot.stop()


def true_stereo(fake: FakeDiscord, tmp_path: Path, seconds: float = 3.0) -> dict:
    path = tmp_path / "stereo.wav"
    tone = random.uniform(200.0, 400.0)
    ffmpeg("-f", "lavfi", "-i", f"sine=f={tone}:d={seconds}", "-f", "lavfi", "-i", f"sine=f={tone * 1.5}:d={seconds}",
           "-filter_complex", "[0][1]join=inputs=2:channel_layout=stereo", "-ar", "44100", str(path))
    return fake.add_attachment("stereo.wav", path.read_bytes(), content_type="audio/wav")


async def test_a_hung_model_host_is_killed_at_the_deadline_and_the_job_retried_then_failed(tmp_path, faulty_dir):
    async with FakeDiscord() as fake:
        # A 3 s track may take 15 + 1 x 3 x 1 = 18 s on the host before it is killed: about 3
        # times what a normal one takes on a busy 2-core machine.
        bot = BotProcess(fake, tmp_path / "data", faulty_dir, STEMBOT_MODEL="tinyhang", STEMBOT_MAX_ATTEMPTS="2",
                         STEMBOT_JOB_DEADLINE_MARGIN_S="15", STEMBOT_JOB_DEADLINE_FACTOR="1",
                         STEMBOT_JOB_DEADLINE_DEFAULT_SPEED="1", PYTHONPATH=REPOSITORY)
        database = tmp_path / "data" / "stembot.sqlite3"
        try:
            await bot.start()
            first_host = model_hosts(bot.process.pid)
            hung = await fake.send_slash_command("split", [attachment_option("file", true_stereo(fake, tmp_path))])
            result = await final_message(fake, hung, timeout=240)
            assert "Couldn't split" in result.content and TIMED_OUT in result.content, result.content
            ((_, state, attempts, slot, quota, kind),) = rows(database)
            assert (state, attempts, slot, kind) == ("failed", 2, "released", "deadline")
            assert quota in ("released", "none")  # nothing charged
            log = bot.log.read_text(errors="replace")
            assert log.count("past its deadline on the model host") == 2
            hosts = model_hosts(bot.process.pid)
            assert hosts and not set(hosts) & set(first_host)  # killed and started again

            # The restarted host runs the next job (identical channels: the model does not hang).
            interaction = await fake.send_slash_command(
                "split", [attachment_option("file", upload(fake, tmp_path, seconds=3.0))])
            result = await final_message(fake, interaction, timeout=60)
            assert "Done" in result.content, result.content
            assert len(answers(fake, interaction, "song.wav")) == 1
            assert len(answers(fake, hung, "stereo.wav")) == 1
        finally:
            await bot.stop()
