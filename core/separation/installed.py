"""The models a host can run offline, with the family and stems the model choice reads:
as published where stembot knows the name (`core.separation.published`), else from the
model itself (a checkpoint's config, or the loaded demucs model's sources)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import yaml

from core.errors import ModelUnavailableError
from core.separation import catalogue, checkpoint_models
from core.separation.model_choice import InstalledModel
from core.separation.published import BY_NAME, FAMILY_COST_FACTOR, cost_factor_of

log = logging.getLogger(__name__)


def installed_models(names: Iterable[str], model_dir: Path | None) -> list[InstalledModel]:
    """`names` (models available offline) as the model choice sees them; a model that
    cannot be read is left out (it would fail its jobs anyway), and logged."""
    found = []
    for name in names:
        try:
            found.append(describe(name, model_dir))
        except (ModelUnavailableError, OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            log.warning("model %s left out of the model choice: it cannot be read", name, exc_info=True)
    return found


def describe(name: str, model_dir: Path | None) -> InstalledModel:
    """One model's family and stems."""
    if name in BY_NAME:
        published = BY_NAME[name]
        return InstalledModel(name, published.family, published.stems)
    checkpoint = _checkpoint_config(name, model_dir)
    if checkpoint is not None:
        return checkpoint
    model = catalogue.load(name, model_dir)
    return InstalledModel(name, "demucs", tuple(str(source).lower() for source in model.sources))


def _checkpoint_config(name: str, model_dir: Path | None) -> InstalledModel | None:
    """A community checkpoint (`NAME.ckpt` beside `NAME.yaml`): its family and stems from
    its config (`core.separation.checkpoint_models`)."""
    if name not in checkpoint_models.checkpoint_names(model_dir):
        return None
    assert model_dir is not None  # checkpoint_names finds none without a folder
    checkpoint = checkpoint_models.describe(name, model_dir)
    return InstalledModel(name, checkpoint.family, checkpoint.sources)


def cost_factor_for(name: str, model_dir: Path | None) -> float:
    """Minutes charged per audio minute for a model named outright, without loading it."""
    if name in BY_NAME:
        return BY_NAME[name].cost_factor
    try:
        checkpoint = _checkpoint_config(name, model_dir)
    except ModelUnavailableError:
        return max(FAMILY_COST_FACTOR.values())  # unreadable: its job fails uncharged anyway
    return checkpoint.cost_factor if checkpoint is not None else cost_factor_of(name, "demucs")
