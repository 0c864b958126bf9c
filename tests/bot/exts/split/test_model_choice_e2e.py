"""Models chosen in plain words, end to end: the real `stembot run` against the fake Discord,
with tiny models in its model folder under the names the choice reads (`htdemucs_ft`, a
published name, `vocals_mel_band_roformer`, a tiny community checkpoint under the name of the
best published vocal model, `tinydnr`, an unlisted model whose stems make it a dialogue model,
and `tinyderev`, the operator's de-reverb model)."""

from __future__ import annotations

import sqlite3

import pytest
import pytest_asyncio

from core.separation.published import BY_NAME
from tests.bot.conftest import BotProcess
from tests.bot.helpers import MANAGE_SERVER, final_message, private_answer, subcommand, upload
from tests.support import checkpoints
from tests.support import models as tiny
from tests.support.fake_discord import attachment_option, string_option

MEL = BY_NAME["vocals_mel_band_roformer"]  # its published speed and measured cost

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bot(fake, tmp_path_factory):
    folder = tmp_path_factory.mktemp("choice-models")
    tiny.save_th(tiny.tiny_htdemucs(seed=0), folder, "tiny")
    tiny.save_th(tiny.tiny_htdemucs(seed=3), folder, "htdemucs_ft")  # published: 4x, the best full split
    tiny.save_th(tiny.tiny_htdemucs(seed=4, sources=["dialog", "music", "effect"]), folder, "tinydnr")
    tiny.save_th(tiny.tiny_htdemucs(seed=5, sources=["noreverb", "reverb"]), folder, "tinyderev")
    # A tiny Mel-Band RoFormer under the published name of the best vocal model.
    checkpoints.save_checkpoint(folder, "vocals_mel_band_roformer", checkpoints.mel_band_roformer_config())
    # As an operator names a de-reverb model that stembot does not list.
    process = BotProcess(fake, tmp_path_factory.mktemp("choice-bot"), folder,
                         STEMBOT_QUOTA_USER_MINUTES_PER_DAY="5", STEMBOT_DEREVERB_MODEL="tinyderev")
    await process.start()
    yield process
    await process.stop()


def rows(bot, sql: str, *args):
    return sqlite3.connect(bot.data_dir / "stembot.sqlite3").execute(sql, args).fetchall()


async def answer_text(fake, interaction) -> str:
    """An ephemeral answer: given at once, or after a defer as the edited reply."""
    await fake.wait_for(lambda: interaction.acknowledged, timeout=5, what="an answer")
    if interaction.callback_data.get("content"):
        return interaction.callback_data["content"]
    message = await fake.wait_for(lambda: next(iter(fake.messages_for(interaction)), None), timeout=10,
                                  what="the deferred answer")
    return message.content


async def test_help_lists_what_each_option_runs_with_its_cost(fake, bot):
    text = await answer_text(fake, await fake.send_slash_command("help"))
    assert "`/split quality: best`: `htdemucs_ft` — drums, bass, other, vocals · slow · minutes count 4x" in text
    assert "`/split stems: dialogue`: `tinydnr` — dialog, music, effect" in text
    assert (f"`/karaoke quality: best`: `vocals_mel_band_roformer` — vocals, other · {MEL.speed} · "
            f"minutes count {MEL.cost_factor:g}x") in text
    assert "`/split clean: dereverb`: `tinyderev` — noreverb, reverb · fast · minutes count 2x" in text
    assert "backing_vocals: keep" not in text  # no lead/backing model here


async def test_quality_best_runs_the_best_model_and_charges_its_factor(fake, bot, tmp_path):
    member = fake.make_user("picky")
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "b.wav", 6)),
                                                  string_option("quality", "best")], user=member)
    result = await final_message(fake, job)
    # The status message said which model runs and what its minutes count, before the result.
    shown = [edit.get("content") or "" for message in fake.messages_for(job) for edit in message.edits]
    assert any("htdemucs_ft" in text and "minutes count 4x" in text for text in shown), shown
    assert "Done" in result.content and "4 stems" in result.content
    # Charged once the delivery is written, a moment after Discord shows it.
    await fake.wait_for(lambda: rows(bot, "SELECT quota_state FROM jobs WHERE source_name='b.wav'") == [
        ("charged",)], timeout=10, interval=0.05, what="the job to be charged")
    assert rows(bot, "SELECT model, stems, cost_factor, quota_state, reserved_s FROM jobs WHERE source_name='b.wav'"
                ) == [("htdemucs_ft", "all", 4.0, "charged", pytest.approx(6.0, abs=0.05))]
    used = rows(bot, "SELECT used_s FROM quota_usage WHERE user_id = ?", int(member["id"]))
    assert used and used[0][0] == pytest.approx(24.0, abs=0.2)  # 6 s of audio at 4x
    quota = await answer_text(fake, await fake.send_slash_command("quota", user=member))
    assert "4.6 of 5 min left today" in quota and "`/split quality: best` costs 4x minutes" in quota


async def test_karaoke_quality_best_runs_the_roformer_over_demucs(fake, bot, tmp_path):
    job = await fake.send_slash_command("karaoke", [attachment_option("file", upload(fake, tmp_path, "sing.wav")),
                                                    string_option("quality", "best")])
    result = await final_message(fake, job)
    assert "Done" in result.content
    assert [a.filename for a in result.attachments] == ["vocals.mp3", "no_vocals.mp3", "preview.png"]
    assert rows(bot, "SELECT model, stems, cost_factor FROM jobs WHERE source_name='sing.wav'") == [
        ("vocals_mel_band_roformer", "karaoke", MEL.cost_factor)]


async def test_stems_dialogue_runs_the_dialogue_model(fake, bot, tmp_path):
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "film.wav")),
                                                  string_option("stems", "dialogue")])
    result = await final_message(fake, job)
    assert "Done" in result.content
    assert [a.filename for a in result.attachments] == ["dialog.mp3", "music.mp3", "effect.mp3", "preview.png"]
    assert rows(bot, "SELECT model, stems, cost_factor FROM jobs WHERE source_name='film.wav'") == [
        ("tinydnr", "all", 1.0)]


async def test_clean_runs_two_models_in_one_job_and_charges_both(fake, bot, tmp_path):
    member = fake.make_user("echoey")
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "wet.wav", 6)),
                                                  string_option("clean", "dereverb")], user=member)
    result = await final_message(fake, job)
    assert "Done" in result.content
    assert [a.filename for a in result.attachments] == ["noreverb.mp3", "reverb.mp3", "preview.png"]
    shown = [edit.get("content") or "" for message in fake.messages_for(job) for edit in message.edits]
    assert any("tiny → tinyderev" in text and "minutes count 2x" in text for text in shown), shown
    await fake.wait_for(lambda: rows(bot, "SELECT quota_state FROM jobs WHERE source_name='wet.wav'") == [
        ("charged",)], timeout=10, interval=0.05, what="the job to be charged")
    assert rows(bot, "SELECT model, clean_model, stems, cost_factor FROM jobs WHERE source_name='wet.wav'") == [
        ("tiny", "tinyderev", "all", 2.0)]
    used = rows(bot, "SELECT used_s FROM quota_usage WHERE user_id = ?", int(member["id"]))
    assert used and used[0][0] == pytest.approx(12.0, abs=0.2)  # 6 s through two models at 1x each


async def test_a_model_that_is_not_installed_is_refused_privately_and_costs_nothing(fake, bot, tmp_path):
    member = fake.make_user("singer")
    before = rows(bot, "SELECT count(*) FROM jobs")[0][0]
    for options, missing in (([string_option("backing_vocals", "keep")], "no lead/backing vocal"),
                             ([string_option("model", "tiny"), string_option("quality", "best")], "not both")):
        job = await fake.send_slash_command(
            "karaoke", [attachment_option("file", upload(fake, tmp_path, "k.wav")), *options], user=member)
        text = await private_answer(fake, job)
        assert missing in text
    text = await private_answer(fake, await fake.send_slash_command(
        "split", [attachment_option("file", upload(fake, tmp_path, "c.wav")), string_option("clean", "denoise")],
        user=member))
    assert text == ("This bot has no denoise model installed; the bot's operator can install one "
                    "(`stembot models pull NAME`; README, Models).")
    assert rows(bot, "SELECT count(*) FROM jobs")[0][0] == before
    assert rows(bot, "SELECT used_s + reserved_s FROM quota_usage WHERE user_id = ?", int(member["id"])) in (
        [], [(0.0,)])


async def test_a_server_that_allows_none_of_them_is_told_who_can_allow_one(fake, bot, tmp_path):
    """Last: it changes the server's allowed models. `/stembot models` takes the new names."""
    admin = await fake.send_slash_command("stembot", subcommand("models", string_option(
        "allowed", "tiny,vocals_mel_band_roformer")), member_permissions=MANAGE_SERVER)
    assert "Models allowed: tiny, vocals_mel_band_roformer" in await private_answer(fake, admin)
    before = rows(bot, "SELECT count(*) FROM jobs")[0][0]
    text = await private_answer(fake, await fake.send_slash_command(
        "split", [attachment_option("file", upload(fake, tmp_path, "talk.wav")), string_option("stems", "dialogue")]))
    assert text == ("This server allows no dialogue model; a server manager can allow tinydnr with "
                    "`/stembot models`.")
    # `best` keeps to what is allowed: htdemucs_ft is not, so the full split's best is `tiny`.
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "ok.wav")),
                                                  string_option("quality", "best")])
    assert "Done" in (await final_message(fake, job)).content
    assert rows(bot, "SELECT model, cost_factor FROM jobs WHERE source_name='ok.wav'") == [("tiny", 1.0)]
    assert rows(bot, "SELECT count(*) FROM jobs")[0][0] == before + 1
