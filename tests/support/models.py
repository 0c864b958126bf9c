"""Tiny Demucs models built with demucs's own classes, saved where its loaders look.

HTDemucs with channels=8, depth=4, nfft=4096 has about 377k parameters: it runs the
real transformer path in a fraction of a second per segment. Smaller nfft/depth
settings have tried to allocate tens of GB, and channels below dconv_comp crash.

`SHORT_SEGMENT` (2 s instead of htdemucs's 7.8 s) makes a model whose segment grid and
block context are four times finer: block tests (core.separation.blockwise) then cross the
same boundaries with 8-second blocks on a 30-second track instead of 16-second blocks on a
60-second one, for less than half the CPU time.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import torch
from demucs.htdemucs import HTDemucs

SOURCES = ["drums", "bass", "other", "vocals"]
SHORT_SEGMENT = Fraction(2)


def tiny_htdemucs(seed: int = 0, sources: list[str] = SOURCES, klass=None, **overrides):
    """`klass`: HTDemucs or a subclass of it (the same weights for the same seed)."""
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(seed)
    kwargs = dict(channels=8, depth=4, nfft=4096, t_layers=1, t_heads=1, dconv_comp=4,
                  segment=Fraction(39, 5))
    kwargs.update(overrides)
    return (klass or HTDemucs)(sources=list(sources), **kwargs)


class MixAsEveryStem(HTDemucs):
    """Every stem is a quarter of the mix: stems that add up to the input and keep its
    tempo and key, as a trained model's do and a random tiny model's do not (for the
    tests of the tempo and key analysis, which reads the stems)."""

    def forward(self, mix):
        return mix.unsqueeze(1).expand(-1, len(self.sources), -1, -1) / len(self.sources)


def package(model) -> dict:
    """The dict demucs's `load_model` expects in a `.th` file."""
    args, kwargs = model._init_args_kwargs
    return {"klass": model.__class__, "args": args, "kwargs": kwargs, "state": model.state_dict()}


def save_th(model, folder: Path, name: str) -> Path:
    """Save as `folder/<name>.th` (no checksum: the name must not contain '-')."""
    assert "-" not in name, "demucs reads text after the last '-' as a checksum"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.th"
    torch.save(package(model), path)
    return path


def save_checksummed(model, folder: Path, name: str) -> Path:
    """Save as `folder/<name>-<sha8>.th` through demucs's own save_with_checksum."""
    from demucs.states import save_with_checksum

    folder.mkdir(parents=True, exist_ok=True)
    save_with_checksum(package(model), folder / f"{name}.th")
    (match,) = folder.glob(f"{name}-*.th")
    return match


def save_bag(folder: Path, name: str, members: list[str], weights: list[list[float]] | None = None) -> Path:
    path = folder / f"{name}.yaml"
    text = f"models: {json.dumps(members)}\n"
    if weights is not None:
        text += f"weights: {json.dumps(weights)}\n"
    path.write_text(text)
    return path


def fill_hf_cache(cache_dir: Path, name: str, repo_id: str, models: dict[str, object]) -> None:
    """Lay out a HuggingFace hub cache as `hf_hub_download` leaves it, holding `name`.yaml
    and one safetensors per model, in the format of demucs's HF export."""
    from safetensors.torch import save_file

    def encode(value):
        if isinstance(value, Fraction):
            return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        return value

    revision = "0" * 40
    root = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    (snapshot / f"{name}.yaml").write_text(f"models: {json.dumps(list(models))}\n")
    for sig, model in models.items():
        args, kwargs = model._init_args_kwargs
        klass = f"{model.__class__.__module__}.{model.__class__.__name__}"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(snapshot / f"{sig}.safetensors"), metadata={
            "klass": klass, "args": json.dumps(encode(list(args))), "kwargs": json.dumps(encode(kwargs)),
        })
