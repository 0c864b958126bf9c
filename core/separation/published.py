"""The models stembot knows by name: what each separates into, what it is good for, what
it costs, and what its publisher says about its weights.

Stembot ships no weights. `stembot models pull NAME` fetches a listed model from where it
is published; a model folder may also hold models that are not listed (their stems come
from their own files, their uses from their stems).

A use is what a member asks for in plain words, never a model name:

- `stems`: a full split (drums, bass, other, vocals, ...);
- `vocals`: vocals against the rest (acapellas, karaoke);
- `lead_backing`: the lead vocal apart from the backing vocals (karaoke that keeps them);
- `dereverb`, `denoise`: a cleaner acapella, from a vocals stem;
- `dialogue`: speech, music and effects of a recording.
"""

from __future__ import annotations

from dataclasses import dataclass

USES = ("stems", "vocals", "lead_backing", "dereverb", "denoise", "dialogue")
FAMILIES = ("demucs", "bs_roformer", "mel_band_roformer", "mdx23c", "scnet")


@dataclass(frozen=True)
class PublishedModel:
    """One model as its publisher describes it."""

    name: str  # what operators and members type: the file stem of its weights
    family: str  # one of FAMILIES
    stems: tuple[str, ...]  # the sources it estimates, in the model's order
    uses: tuple[str, ...]  # what it is good for, each one of USES
    # Compute per audio minute relative to htdemucs (1.0), measured by bench/model_families.py
    # on the same machine; a job is charged its minutes times this.
    cost_factor: float
    speed: str  # "fast" | "medium" | "slow": the class of cost_factor, for people
    quality: str  # the publisher's figure, e.g. "vocals SDR 12.9 (MUSDB18-HQ)"
    license: str  # the weights' license as published ("not stated" where none is)
    # (file name, URL) of every file `stembot models pull` fetches into the model folder: the
    # weights `NAME.ckpt` and the config `NAME.yaml` for checkpoint families (renamed to the
    # model's name where the publisher names them otherwise).
    files: tuple[tuple[str, str], ...] = ()
    # (file name, sha256) where a digest of a pinned file is known; a pull checks it.
    sha256: tuple[tuple[str, str], ...] = ()


MUSDB = ("drums", "bass", "other", "vocals")

PUBLISHED: tuple[PublishedModel, ...] = (
    PublishedModel("htdemucs", "demucs", MUSDB, ("stems", "vocals"), 1.0, "fast",
                   "average SDR 9.0 (MUSDB18-HQ)", "MIT"),
    PublishedModel("htdemucs_ft", "demucs", MUSDB, ("stems", "vocals"), 4.0, "slow",
                   "average SDR 9.2 (MUSDB18-HQ)", "MIT"),
    PublishedModel("htdemucs_6s", "demucs", (*MUSDB, "guitar", "piano"), ("stems",), 1.0, "fast",
                   "average SDR 8.5 on the four MUSDB stems; guitar and piano rough", "MIT"),
    PublishedModel("hdemucs_mmi", "demucs", MUSDB, ("stems",), 1.0, "fast",
                   "average SDR 7.7 (MUSDB18-HQ)", "MIT"),
)

# Community checkpoints (weights + YAML config), as python-audio-separator 0.47.1 and
# ZFTurbo's Music-Source-Separation-Training list them. Quality: the median SDR over the
# MUSDB18-HQ test set in audio-separator's models-scores.json unless said otherwise. Stems: the
# YAML's `training.instruments`, lower-cased; where the YAML names a `target_instrument`, the
# model estimates that one and the other is the mix minus it.
UVR_MODELS = "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models"
UVR_CONFIGS = "https://raw.githubusercontent.com/TRvlvr/application_data/main/mdx_model_data/mdx_c_configs"
MSST_RELEASES = "https://github.com/ZFTurbo/Music-Source-Separation-Training/releases/download"
MSST_CONFIGS = "https://raw.githubusercontent.com/ZFTurbo/Music-Source-Separation-Training/main/configs"
AUDIO_SEPARATOR_MODELS = "https://github.com/nomadkaraoke/python-audio-separator/releases/download/model-configs"
KIM_MEL_BAND = "https://huggingface.co/KimberleyJSN/melbandroformer/resolve/ac9b0614ab3cd7f77219e18ba494dfd93956c348"
ANVUEW_DEREVERB = "https://huggingface.co/anvuew/dereverb_mel_band_roformer/resolve/main"


def _checkpoint(name: str, ckpt_url: str, yaml_url: str) -> tuple[tuple[str, str], ...]:
    return ((f"{name}.ckpt", ckpt_url), (f"{name}.yaml", yaml_url))


CHECKPOINTS: tuple[PublishedModel, ...] = (
    PublishedModel(
        "model_bs_roformer_ep_317_sdr_12.9755", "bs_roformer", ("vocals", "instrumental"), ("vocals",),
        2.5, "medium", "vocals SDR 11.8, instrumental 16.5 (MUSDB18-HQ)", "not stated",
        _checkpoint("model_bs_roformer_ep_317_sdr_12.9755",
                    f"{UVR_MODELS}/model_bs_roformer_ep_317_sdr_12.9755.ckpt",
                    f"{UVR_CONFIGS}/model_bs_roformer_ep_317_sdr_12.9755.yaml")),
    PublishedModel(
        "vocals_mel_band_roformer", "mel_band_roformer", ("vocals", "other"), ("vocals",),
        2.5, "medium", "vocals SDR 12.6 (MUSDB18-HQ)", "MIT",
        _checkpoint("vocals_mel_band_roformer",
                    f"{KIM_MEL_BAND}/MelBandRoformer.ckpt",
                    f"{MSST_CONFIGS}/KimberleyJensen/config_vocals_mel_band_roformer_kj.yaml"),
        (("vocals_mel_band_roformer.ckpt", "87201f4d31afb5bc79993230fc49446918425574db48c01c405e44f365c7559e"),)),
    PublishedModel(
        "MDX23C-8KFFT-InstVoc_HQ", "mdx23c", ("vocals", "instrumental"), ("vocals",),
        2.0, "medium", "vocals SDR 10.6, instrumental 15.8 (MUSDB18-HQ)", "not stated",
        _checkpoint("MDX23C-8KFFT-InstVoc_HQ",
                    f"{UVR_MODELS}/MDX23C-8KFFT-InstVoc_HQ.ckpt",
                    f"{UVR_CONFIGS}/model_2_stem_full_band_8k.yaml")),
    PublishedModel(
        "model_bs_roformer_ep_17_sdr_9.6568", "bs_roformer", ("drums", "bass", "other", "vocals"),
        ("stems", "vocals"), 2.5, "medium",
        "average SDR 9.65, vocals 11.1 (MUSDB18-HQ test, publisher's figure; trained on MUSDB18-HQ only)",
        "not stated",
        _checkpoint("model_bs_roformer_ep_17_sdr_9.6568",
                    f"{MSST_RELEASES}/v1.0.12/model_bs_roformer_ep_17_sdr_9.6568.ckpt",
                    f"{MSST_RELEASES}/v1.0.12/config_bs_roformer_384_8_2_485100.yaml")),
    # Lead vocals against the rest (the instrumental with its backing vocals).
    PublishedModel(
        "mel_band_roformer_karaoke_aufr33_viperx_sdr_10.1956", "mel_band_roformer", ("vocals", "instrumental"),
        ("lead_backing",), 2.5, "medium", "lead vocals SDR 8.4, the rest 14.7 (MUSDB18-HQ)", "not stated",
        _checkpoint("mel_band_roformer_karaoke_aufr33_viperx_sdr_10.1956",
                    f"{AUDIO_SEPARATOR_MODELS}/mel_band_roformer_karaoke_aufr33_viperx_sdr_10.1956.ckpt",
                    f"{AUDIO_SEPARATOR_MODELS}/mel_band_roformer_karaoke_aufr33_viperx_sdr_10.1956_config.yaml")),
    PublishedModel(
        "dereverb_mel_band_roformer_anvuew_sdr_19.1729", "mel_band_roformer", ("noreverb", "reverb"),
        ("dereverb",), 2.5, "medium", "SDR 19.2 (publisher's own test set)", "not stated",
        _checkpoint("dereverb_mel_band_roformer_anvuew_sdr_19.1729",
                    f"{ANVUEW_DEREVERB}/dereverb_mel_band_roformer_anvuew_sdr_19.1729.ckpt",
                    f"{ANVUEW_DEREVERB}/dereverb_mel_band_roformer_anvuew.yaml")),
    PublishedModel(
        "denoise_mel_band_roformer_aufr33_sdr_27.9959", "mel_band_roformer", ("dry", "other"),
        ("denoise",), 2.5, "medium", "SDR 28.0 (publisher's own test set)", "not stated",
        _checkpoint("denoise_mel_band_roformer_aufr33_sdr_27.9959",
                    f"{MSST_RELEASES}/v.1.0.7/denoise_mel_band_roformer_aufr33_sdr_27.9959.ckpt",
                    f"{MSST_RELEASES}/v.1.0.7/model_mel_band_roformer_denoise.yaml")),
    # No dialogue/music/effects (DnR) model is published in these families: the published DnR
    # models (BandIt, BandIt Plus) are an architecture audio-separator does not run.
)

PUBLISHED = PUBLISHED + CHECKPOINTS

BY_NAME: dict[str, PublishedModel] = {model.name: model for model in PUBLISHED}


def speed_class(cost_factor: float) -> str:
    """The word people read for a cost factor."""
    return "fast" if cost_factor <= 1.5 else "medium" if cost_factor <= 3.0 else "slow"


def uses_of(name: str, stems: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """What a model is good for: as published, else read from its stems."""
    if name in BY_NAME:
        return BY_NAME[name].uses
    lowered = {stem.lower() for stem in stems}
    found: list[str] = []
    if {"drums", "bass"} <= lowered:
        found.append("stems")
    if "vocals" in lowered:
        found.append("vocals")
    if {"dialog", "dialogue", "speech"} & lowered:
        found.append("dialogue")
    return tuple(found)


# A model folder's unlisted models cost what their family costs at its published sizes
# (bench/model_families.py measures these; demucs is the unit).
FAMILY_COST_FACTOR: dict[str, float] = {
    "demucs": 1.0,
    "bs_roformer": 2.5,
    "mel_band_roformer": 2.5,
    "mdx23c": 2.0,
    "scnet": 1.5,
}


def cost_factor_of(name: str, family: str) -> float:
    """Minutes charged per audio minute for `name`: as listed, else its family's."""
    if name in BY_NAME:
        return BY_NAME[name].cost_factor
    return FAMILY_COST_FACTOR.get(family, 1.0)
