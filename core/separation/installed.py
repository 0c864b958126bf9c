"""The models a host can run offline, with the family and stems the model choice reads:
as published where stembot knows the name (`core.separation.published`), else from the
model itself (a checkpoint's YAML, or the loaded demucs model's sources)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import yaml

from core.errors import ModelUnavailableError
from core.separation import catalogue
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
    """A community checkpoint (`NAME.ckpt` beside `NAME.yaml`): its instruments from the YAML.
    Its family is not in the YAML in a standard form: an unlisted checkpoint costs as a
    RoFormer (the dearest family), which never undercharges."""
    if model_dir is None or not (Path(model_dir) / f"{name}.ckpt").is_file():
        return None
    with open(Path(model_dir) / f"{name}.yaml") as file:
        config = yaml.safe_load(file)
    training = config["training"]
    instruments = [str(i).lower() for i in training["instruments"]]
    return InstalledModel(name, "bs_roformer", tuple(instruments))


def cost_factor_for(name: str, model_dir: Path | None) -> float:
    """Minutes charged per audio minute for a model named outright, without loading it."""
    if name in BY_NAME:
        return BY_NAME[name].cost_factor
    try:
        checkpoint = _checkpoint_config(name, model_dir)
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return max(FAMILY_COST_FACTOR.values())  # unreadable: its job fails uncharged anyway
    return checkpoint.cost_factor if checkpoint is not None else cost_factor_of(name, "demucs")
