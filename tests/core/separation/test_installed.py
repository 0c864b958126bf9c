"""core.separation.installed: the family and stems the model choice reads of each model."""

from __future__ import annotations

from core.separation.installed import cost_factor_for, installed_models
from core.separation.model_choice import InstalledModel
from core.separation.published import FAMILY_COST_FACTOR


def test_each_kind_of_model_is_read_from_where_it_says_what_it_is(model_dir):
    found = {m.name: m for m in installed_models(["htdemucs_ft", "tiny", "tinyroformer", "nosuchmodel"], model_dir)}
    # Listed: as published, without loading anything. A model folder's demucs model: its sources.
    # A checkpoint: its config's family and stems (the target first, then the rest of the mix).
    assert found == {
        "htdemucs_ft": InstalledModel("htdemucs_ft", "demucs", ("drums", "bass", "other", "vocals")),
        "tiny": InstalledModel("tiny", "demucs", ("drums", "bass", "other", "vocals")),
        "tinyroformer": InstalledModel("tinyroformer", "bs_roformer", ("vocals", "instrumental")),
    }
    assert found["tinyroformer"].uses == ("vocals",)
    assert found["tinyroformer"].cost_factor == FAMILY_COST_FACTOR["bs_roformer"]


def test_a_model_named_outright_costs_its_factor_without_loading(model_dir):
    assert cost_factor_for("htdemucs_ft", model_dir) == 4.0
    assert cost_factor_for("tinyroformer", model_dir) == FAMILY_COST_FACTOR["bs_roformer"]
    assert cost_factor_for("tiny", model_dir) == 1.0
