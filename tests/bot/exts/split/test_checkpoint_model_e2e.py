"""End to end (#16): `/split model: tinyroformer`, a community checkpoint (`.ckpt` + `.yaml`) beside
the tiny Demucs models of the model folder, through the real `stembot run` process and its
model host against the fake Discord."""

from __future__ import annotations

import numpy as np
import pytest

from core.media.audio import Limits, decode
from tests.bot.helpers import final_message, private_answer, upload
from tests.support.fake_discord import attachment_option, string_option

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_split_with_a_checkpoint_model_delivers_its_stems(fake, bot, tmp_path):
    song = upload(fake, tmp_path, "song.wav")
    interaction = await fake.send_slash_command("split", [attachment_option("file", song),
                                                          string_option("model", "tinyroformer"),
                                                          string_option("format", "flac")])
    result = await final_message(fake, interaction)
    assert "Done" in result.content and "2 stems" in result.content, result.content
    names = [a.filename for a in result.attachments]
    assert names == ["vocals.flac", "instrumental.flac", "preview.png"]
    stems = {}
    for name in ("vocals", "instrumental"):
        path = tmp_path / f"{name}.flac"
        path.write_bytes(result.attachment_named(f"{name}.flac").data)
        stems[name] = decode(path, 44100, 2, Limits())
    mix_path = tmp_path / "mix.wav"
    mix_path.write_bytes(fake.attachments[int(song["id"])].data)
    mix = decode(mix_path, 44100, 2, Limits())
    # The instrumental is the mix minus the vocals: together they give the mix back (up to FLAC's 16 bits).
    length = min(mix.shape[1], stems["vocals"].shape[1])
    residual = stems["vocals"][:, :length] + stems["instrumental"][:, :length] - mix[:, :length]
    assert float(np.abs(residual).max()) < 1e-3


async def test_karaoke_and_a_stem_the_model_lacks(fake, bot, tmp_path):
    karaoke = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "k.wav")),
                                                      string_option("model", "tinyroformer"),
                                                      string_option("stems", "karaoke")])
    result = await final_message(fake, karaoke)
    assert [a.filename for a in result.attachments][:2] == ["vocals.mp3", "no_vocals.mp3"], result.content
    drums = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "d.wav")),
                                                    string_option("model", "tinyroformer"),
                                                    string_option("stems", "drums")])
    refusal = await final_message(fake, drums)
    assert "unknown stem 'drums'" in refusal.content and "instrumental" in refusal.content, refusal.content


async def test_the_model_is_offered_and_a_listed_one_not_in_the_folder_is_refused(fake, bot, tmp_path):
    unknown = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "u.wav")),
                                                      string_option("model", "model_bs_roformer_ep_317_sdr_12.9755")])
    text = await private_answer(fake, unknown, timeout=5.0)
    assert "Unknown model" in text and "tinyroformer" in text, text
