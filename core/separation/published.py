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
    # (file name, URL) of every file `stembot models pull` fetches into the model folder.
    files: tuple[tuple[str, str], ...] = ()


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
