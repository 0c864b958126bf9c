"""core.separation.model_choice: the model a request in plain words runs, from what is
installed, what the operator chose and what the server allows."""

from __future__ import annotations

import pytest

from core.separation.model_choice import (
    Choice,
    InstalledModel,
    ModelChoiceError,
    ModelDefaults,
    Request,
    choose,
    offers,
)
from core.separation.published import BY_NAME, FAMILY_COST_FACTOR

BS = FAMILY_COST_FACTOR["bs_roformer"]
MEL = FAMILY_COST_FACTOR["mel_band_roformer"]

MUSDB = ("drums", "bass", "other", "vocals")
HTDEMUCS = InstalledModel("htdemucs", "demucs", MUSDB)
HTDEMUCS_FT = InstalledModel("htdemucs_ft", "demucs", MUSDB)
# Unlisted models: their uses come from their stems, their cost from their family.
ROFORMER = InstalledModel("my_bs_roformer", "bs_roformer", ("vocals", "instrumental"))
MELBAND = InstalledModel("my_mel_roformer", "mel_band_roformer", ("vocals", "instrumental"))
DNR = InstalledModel("my_dnr", "demucs", ("dialog", "music", "effect"))
DEFAULTS = ModelDefaults(model="htdemucs")


def pick(installed, allowed=None, defaults=DEFAULTS, server_default=None, **request) -> Choice:
    return choose(Request(**request), installed, defaults, allowed, server_default)


def refusal(installed, allowed=None, defaults=DEFAULTS, **request) -> str:
    with pytest.raises(ModelChoiceError) as refused:
        pick(installed, allowed, defaults, **request)
    return refused.value.reason


def test_nothing_asked_runs_the_servers_default_then_the_operators():
    assert pick([HTDEMUCS, HTDEMUCS_FT]) == Choice("htdemucs", "all", 1.0)
    assert pick([HTDEMUCS, HTDEMUCS_FT], server_default="htdemucs_ft") == Choice("htdemucs_ft", "all", 4.0)
    assert pick([HTDEMUCS], model="htdemucs", stems="vocals") == Choice("htdemucs", "vocals", 1.0)


def test_fast_is_the_operators_fast_model():
    assert pick([HTDEMUCS, HTDEMUCS_FT], quality="fast").model == "htdemucs"
    fast = ModelDefaults(model="htdemucs_ft", fast="htdemucs")
    assert pick([HTDEMUCS, HTDEMUCS_FT], defaults=fast, quality="fast", stems="karaoke") == Choice(
        "htdemucs", "karaoke", 1.0)
    assert "operator's fast model `htdemucs` is not installed" in refusal([HTDEMUCS_FT], quality="fast")


def test_best_vocals_is_a_roformer_over_demucs_whatever_their_figures():
    installed = [HTDEMUCS, HTDEMUCS_FT, ROFORMER]
    for stems in ("karaoke", "vocals", "no_vocals"):
        assert pick(installed, quality="best", stems=stems) == Choice("my_bs_roformer", stems, BS)
    # Without a RoFormer: the demucs model with the higher published SDR.
    assert pick([HTDEMUCS, HTDEMUCS_FT], quality="best", stems="karaoke").model == "htdemucs_ft"


def test_best_for_a_full_split_is_the_best_stems_model_not_a_vocals_one():
    installed = [HTDEMUCS, ROFORMER, HTDEMUCS_FT]
    assert pick(installed, quality="best") == Choice("htdemucs_ft", "all", 4.0)
    # One stem that only a stems model has: a vocals-only model cannot serve it.
    assert pick([ROFORMER, HTDEMUCS], quality="best", stems="drums").model == "htdemucs"


def test_best_keeps_to_what_the_server_allows():
    installed = [HTDEMUCS, HTDEMUCS_FT, ROFORMER, MELBAND]
    allowed = ("htdemucs", "my_mel_roformer")
    assert pick(installed, allowed, quality="best", stems="vocals").model == "my_mel_roformer"
    assert pick(installed, ("htdemucs",), quality="best", stems="vocals").model == "htdemucs"
    assert "allows no full-split model" in refusal(installed, ("my_bs_roformer",), quality="best")
    assert "/stembot models" in refusal(installed, ("my_bs_roformer",), quality="best")


def test_the_operators_best_model_wins_and_must_be_installed_and_allowed():
    defaults = ModelDefaults(best_vocals="my_mel_roformer")
    assert pick([HTDEMUCS, ROFORMER, MELBAND], defaults=defaults, quality="best", stems="vocals").model == (
        "my_mel_roformer")
    assert "is not installed" in refusal([HTDEMUCS, ROFORMER], defaults=defaults, quality="best", stems="vocals")
    assert "does not allow the vocal model `my_mel_roformer`" in refusal(
        [HTDEMUCS, MELBAND], ("htdemucs",), defaults=defaults, quality="best", stems="vocals")


def test_dialogue_needs_a_dialogue_model():
    assert pick([HTDEMUCS, DNR], stems="dialogue") == Choice("my_dnr", "all", 1.0)
    reason = refusal([HTDEMUCS, HTDEMUCS_FT], stems="dialogue")
    assert reason.startswith("this bot has no dialogue model installed") and "stembot models pull" in reason


def test_karaoke_that_keeps_the_backing_vocals_needs_a_lead_backing_model():
    assert "no lead/backing vocal" in refusal([HTDEMUCS, ROFORMER], stems="karaoke", backing_vocals="keep")
    lead_backing = ModelDefaults(lead_backing="my_mel_roformer")
    assert pick([HTDEMUCS, MELBAND], defaults=lead_backing, stems="karaoke", backing_vocals="keep") == Choice(
        "my_mel_roformer", "all", MEL)
    # `remove` is today's karaoke.
    assert pick([HTDEMUCS], stems="karaoke", backing_vocals="remove") == Choice("htdemucs", "karaoke", 1.0)


def test_clean_chains_a_vocal_model_and_the_cleaning_model_costing_both():
    dereverb = InstalledModel("my_dereverb", "mel_band_roformer", ("noreverb", "reverb"))
    defaults = ModelDefaults(dereverb="my_dereverb")
    installed = [HTDEMUCS, ROFORMER, dereverb]
    assert pick(installed, defaults=defaults, clean="dereverb") == Choice(
        "htdemucs", "all", 1.0 + MEL, clean_model="my_dereverb")
    assert pick(installed, defaults=defaults, clean="dereverb", quality="best") == Choice(
        "my_bs_roformer", "all", BS + MEL, clean_model="my_dereverb")
    # A default model without vocals: the best vocal model instead.
    assert pick([DNR, MELBAND, dereverb], defaults=ModelDefaults(model="my_dnr", dereverb="my_dereverb"),
                clean="dereverb").model == "my_mel_roformer"
    assert "no denoise model installed" in refusal(installed, clean="denoise")
    assert "no vocal model installed" in refusal([DNR, dereverb], defaults=ModelDefaults(
        model="my_dnr", dereverb="my_dereverb"), clean="dereverb")
    assert "leave `stems:` out" in refusal([HTDEMUCS, dereverb], defaults=defaults, clean="dereverb", stems="drums")


def test_a_model_named_outright_and_plain_words_do_not_mix():
    assert "not both" in refusal([HTDEMUCS, HTDEMUCS_FT], model="htdemucs", quality="best")


def test_offers_name_what_each_option_runs_here():
    dereverb = InstalledModel("my_dereverb", "mel_band_roformer", ("noreverb", "reverb"))
    shown = offers([HTDEMUCS, HTDEMUCS_FT, ROFORMER, DNR, dereverb], ModelDefaults(dereverb="my_dereverb"),
                   allowed=None)
    assert [(offer.option, offer.model.name) for offer in shown] == [
        ("/split quality: fast", "htdemucs"), ("/split quality: best", "htdemucs_ft"),
        ("/karaoke quality: best", "my_bs_roformer"), ("/split clean: dereverb", "my_dereverb"),
        ("/split stems: dialogue", "my_dnr")]
    assert [offer.cost_factor for offer in shown] == [1.0, 4.0, BS, 1.0 + MEL, 1.0]
    # What the server does not allow is not offered.
    assert [o.option for o in offers([HTDEMUCS, ROFORMER], ModelDefaults(), allowed=("htdemucs",))] == [
        "/split quality: fast", "/split quality: best", "/karaoke quality: best"]


def test_the_published_checkpoints_rank_by_their_published_figures():
    def published(name):
        model = BY_NAME[name]
        return InstalledModel(name, model.family, model.stems)

    names = ["htdemucs", "htdemucs_ft", "model_bs_roformer_ep_317_sdr_12.9755", "vocals_mel_band_roformer",
             "MDX23C-8KFFT-InstVoc_HQ", "model_bs_roformer_ep_17_sdr_9.6568",
             "mel_band_roformer_karaoke_aufr33_viperx_sdr_10.1956", "dereverb_mel_band_roformer_anvuew_sdr_19.1729",
             "denoise_mel_band_roformer_aufr33_sdr_27.9959"]
    installed = [published(name) for name in names]
    # Vocals: the highest vocals figure (Mel-Band 12.6 over BS-RoFormer 11.8, MDX23C 10.6, the
    # 4-stem BS-RoFormer's vocals 11.1, and any Demucs).
    assert pick(installed, quality="best", stems="karaoke") == Choice(
        "vocals_mel_band_roformer", "karaoke", BY_NAME["vocals_mel_band_roformer"].cost_factor)
    assert pick(installed, quality="best") == Choice(
        "model_bs_roformer_ep_17_sdr_9.6568", "all", BY_NAME["model_bs_roformer_ep_17_sdr_9.6568"].cost_factor)
    assert pick(installed, stems="karaoke", backing_vocals="keep").model == (
        "mel_band_roformer_karaoke_aufr33_viperx_sdr_10.1956")
    assert pick(installed, clean="dereverb", quality="best") == Choice(
        "vocals_mel_band_roformer", "all",
        BY_NAME["vocals_mel_band_roformer"].cost_factor
        + BY_NAME["dereverb_mel_band_roformer_anvuew_sdr_19.1729"].cost_factor,
        clean_model="dereverb_mel_band_roformer_anvuew_sdr_19.1729")
    assert pick(installed, clean="denoise").clean_model == "denoise_mel_band_roformer_aufr33_sdr_27.9959"
    assert "no dialogue model installed" in refusal(installed, stems="dialogue")
