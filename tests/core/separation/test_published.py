"""core.separation.published: the listed models are consistent with what stembot does with them."""

from __future__ import annotations

from core.separation.checkpoint_models import FAMILY_MARKERS, stem_name
from core.separation.published import FAMILIES, FAMILY_COST_FACTOR, PUBLISHED, USES, speed_class
from core.separation.stems import PUBLISHED_SOURCES


def test_every_listed_checkpoint_is_pullable_and_its_stems_are_stembots_names():
    checkpoint_families = {family for _, family in FAMILY_MARKERS}
    listed = [model for model in PUBLISHED if model.family != "demucs"]
    assert {"bs_roformer", "mel_band_roformer", "mdx23c"} <= {model.family for model in listed}
    assert {"vocals", "lead_backing", "dereverb", "denoise"} <= {use for model in listed for use in model.uses}
    for model in listed:
        assert model.family in checkpoint_families and model.family in FAMILIES
        names = [name for name, _ in model.files]
        assert names == [f"{model.name}.ckpt", f"{model.name}.yaml"], model.name
        assert all(url.startswith("https://") for _, url in model.files)
        assert {name for name, _ in model.sha256} <= set(names)
        assert all(len(digest) == 64 for _, digest in model.sha256)
        assert tuple(stem_name(stem) for stem in model.stems) == model.stems
        assert PUBLISHED_SOURCES[model.name] == model.stems
        assert model.license and model.quality
    # A job row keeps its model's name in 64 characters (core/jobs/job.py).
    assert max(len(model.name) for model in PUBLISHED) <= 64


def test_speed_classes_and_uses_follow_the_figures():
    for model in PUBLISHED:
        assert model.speed == speed_class(model.cost_factor), model.name
        assert set(model.uses) <= set(USES)
    assert FAMILY_COST_FACTOR["demucs"] == 1.0
    assert set(FAMILY_COST_FACTOR) == set(FAMILIES)
