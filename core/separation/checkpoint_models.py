"""Community checkpoints in a model folder: `NAME.ckpt` (weights) beside `NAME.yaml` (config).

The format is the one python-audio-separator and ZFTurbo's Music-Source-Separation-Training
publish: a YAML with `audio` (STFT and chunk settings), `model` (the network's
hyper-parameters), `training.instruments` (the sources, in the network's output order) and
`training.target_instrument` (set when the network estimates that one source only: the
other is the mix minus it), and `inference` (`dim_t`, `num_overlap`).

The family comes from the `model` section, as audio-separator decides it: `freqs_per_bands`
is a BS-RoFormer, `num_bands` a Mel-Band RoFormer, `num_subbands` an MDX23C (TFC-TDF v3).
The networks are audio-separator's own classes (the optional `models` extra); this module
reads the YAML without them, so the bot can list models on a host without the extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import ModelUnavailableError

WEIGHTS_SUFFIX = ".ckpt"
CONFIG_SUFFIX = ".yaml"
# What the YAML's `model` section says about the network's family.
FAMILY_MARKERS = (("freqs_per_bands", "bs_roformer"), ("num_bands", "mel_band_roformer"),
                  ("num_subbands", "mdx23c"))
MODELS_EXTRA_HINT = "install stembot's `models` extra (pip install 'stembot[models]') on this host"


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader plus `!!python/tuple`, which the published configs use for band lists;
    nothing else of python's tags."""


def _tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Any, ...]:
    assert isinstance(node, yaml.SequenceNode), "!!python/tuple tags a sequence"
    return tuple(loader.construct_sequence(node, deep=True))


_ConfigLoader.add_constructor("tag:yaml.org,2002:python/tuple", _tuple)


@dataclass(frozen=True)
class CheckpointModel:
    """One checkpoint model of a model folder, its config read."""

    name: str
    weights: Path
    config_path: Path
    config: dict[str, Any]
    family: str
    instruments: tuple[str, ...]  # lower-cased, in the network's output order
    target: str | None  # lower-cased `target_instrument`: the one source the network estimates

    @property
    def sources(self) -> tuple[str, ...]:
        """The stems it gives: its instruments (the target first where there is one; the
        other is then the mix minus the target)."""
        if self.target is None:
            return self.instruments
        return (self.target, *(name for name in self.instruments if name != self.target))

    @property
    def estimated(self) -> tuple[str, ...]:
        """The sources the network outputs, in its order."""
        return (self.target,) if self.target is not None else self.instruments

    @property
    def samplerate(self) -> int:
        return int(self.config.get("audio", {}).get("sample_rate", 44100))

    @property
    def audio_channels(self) -> int:
        return int(self.config.get("audio", {}).get("num_channels", 2))


def read_config(path: Path) -> dict[str, Any]:
    with open(path) as file:
        config = yaml.load(file, Loader=_ConfigLoader)  # a SafeLoader with one extra tag
    if not isinstance(config, dict):
        raise ValueError("the YAML is not a mapping")
    return config


def checkpoint_names(model_dir: Path | None) -> list[str]:
    """The checkpoint models of a model folder: every `NAME.ckpt` with its `NAME.yaml`."""
    if model_dir is None or not Path(model_dir).is_dir():
        return []
    return sorted(path.stem for path in Path(model_dir).glob(f"*{WEIGHTS_SUFFIX}")
                  if path.with_suffix(CONFIG_SUFFIX).is_file())


def family_of(config: dict[str, Any]) -> str | None:
    """The network's family from its config's `model` section; None when it is none of them."""
    model = config.get("model")
    if not isinstance(model, dict):
        return None
    for marker, family in FAMILY_MARKERS:
        if marker in model:
            return family
    return None


def describe(name: str, model_dir: Path) -> CheckpointModel:
    """Read `name`'s config from `model_dir`; ModelUnavailableError naming what is wrong."""
    weights = Path(model_dir) / f"{name}{WEIGHTS_SUFFIX}"
    config_path = weights.with_suffix(CONFIG_SUFFIX)
    try:
        config = read_config(config_path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ModelUnavailableError(f"model '{name}': its config {config_path} cannot be read ({exc})") from exc
    family = family_of(config)
    if family is None:
        raise ModelUnavailableError(
            f"model '{name}': its config {config_path} is of an unknown family (its `model` section has none "
            f"of {', '.join(marker for marker, _ in FAMILY_MARKERS)}); stembot runs BS-RoFormer, Mel-Band "
            "RoFormer and MDX23C checkpoints")
    training = config.get("training") or {}
    instruments = training.get("instruments")
    if not isinstance(instruments, list | tuple) or not instruments or not all(isinstance(i, str) for i in instruments):
        raise ModelUnavailableError(f"model '{name}': its config {config_path} has no `training.instruments` list")
    lowered = tuple(stem_name(i) for i in instruments)
    target = training.get("target_instrument")
    target_name = stem_name(target) if isinstance(target, str) and target else None
    if target_name is not None and target_name not in lowered:
        raise ModelUnavailableError(
            f"model '{name}': its target instrument '{target}' is not one of its instruments {list(instruments)}")
    if len(set(lowered)) != len(lowered):
        raise ModelUnavailableError(f"model '{name}': its instruments {list(instruments)} repeat a name")
    return CheckpointModel(name, weights, config_path, config, family, lowered, target_name)


def stem_name(instrument: str) -> str:
    """An instrument's name as stembot exposes it: lower-case, words joined by `_`; a leading
    "no" joined to the rest ("No Reverb" is `noreverb`), since `no_<stem>` is what a request
    writes for "everything but <stem>"."""
    words = instrument.lower().replace("-", " ").replace("_", " ").split()
    if len(words) > 1 and words[0] == "no":
        words = ["no" + words[1], *words[2:]]
    return "_".join(words)
