"""Tiny community checkpoints (`NAME.ckpt` + `NAME.yaml`) built with python-audio-separator's
own classes and random weights, in the published YAML layout (`!!python/tuple` included).

Each runs a forward pass over a 1.5-second chunk in a few milliseconds on one core, so a
test separates several seconds of audio, chunk by chunk, in well under a second.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml

RATE = 44100
# 1.5 s chunks, two per step (num_overlap 2): a 6-second track is 7 chunks.
HOP = 147
DIM_T = 451


def _audio(n_fft: int, hop: int, dim_t: int, dim_f: int | None = None) -> dict[str, Any]:
    return {"chunk_size": hop * (dim_t - 1), "dim_f": dim_f or n_fft // 2, "dim_t": dim_t, "hop_length": hop,
            "n_fft": n_fft, "num_channels": 2, "sample_rate": RATE, "min_mean_abs": 0.0}


def _roformer_model(**extra: Any) -> dict[str, Any]:
    return {"dim": 16, "depth": 1, "stereo": True, "num_stems": 1, "time_transformer_depth": 1,
            "freq_transformer_depth": 1, "dim_head": 8, "heads": 2, "attn_dropout": 0.0, "ff_dropout": 0.0,
            "flash_attn": True, "dim_freqs_in": 129, "stft_n_fft": 256, "stft_hop_length": HOP,
            "stft_win_length": 256, "stft_normalized": False, "mask_estimator_depth": 1,
            "multi_stft_resolution_loss_weight": 1.0, "multi_stft_resolutions_window_sizes": (256, 128),
            "multi_stft_hop_size": 147, "multi_stft_normalized": False, **extra}


def _training(instruments: list[str], target: str | None) -> dict[str, Any]:
    return {"batch_size": 1, "instruments": instruments, "target_instrument": target}


def bs_roformer_config(instruments: list[str] | None = None, target: str | None = "Vocals") -> dict[str, Any]:
    """A BS-RoFormer vocals model, as viperx's `model_bs_roformer_ep_317_sdr_12.9755.yaml` is laid out."""
    instruments = instruments or ["Vocals", "Instrumental"]
    stems = 1 if target else len(instruments)
    return {"audio": _audio(256, HOP, DIM_T),
            "model": _roformer_model(freqs_per_bands=(32, 32, 32, 33), num_stems=stems),
            "training": _training(instruments, target),
            "inference": {"batch_size": 1, "dim_t": DIM_T, "num_overlap": 2}}


def mel_band_roformer_config(instruments: list[str] | None = None, target: str | None = "vocals") -> dict[str, Any]:
    """A Mel-Band RoFormer model, as Kimberley Jensen's vocals config is laid out."""
    instruments = instruments or ["vocals", "other"]
    stems = 1 if target else len(instruments)
    return {"audio": _audio(256, HOP, DIM_T),
            "model": _roformer_model(num_bands=8, sample_rate=RATE, num_stems=stems),
            "training": _training(instruments, target),
            "inference": {"batch_size": 1, "dim_t": DIM_T, "num_overlap": 2}}


def mdx23c_config(instruments: list[str] | None = None, target: str | None = None) -> dict[str, Any]:
    """An MDX23C (TFC-TDF v3) model, as `model_2_stem_full_band_8k.yaml` (InstVoc HQ) is laid out."""
    instruments = instruments or ["Vocals", "Instrumental"]
    return {"audio": _audio(512, 256, 256, dim_f=256),
            "model": {"act": "gelu", "bottleneck_factor": 2, "growth": 4, "norm": "InstanceNorm",
                      "num_blocks_per_scale": 1, "num_channels": 8, "num_scales": 2, "num_subbands": 2,
                      "scale": [2, 2]},
            "training": _training(instruments, target),
            "inference": {"batch_size": 1, "dim_t": 256, "num_overlap": 2}}


def network(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The network of `config` with random weights, built by audio-separator's own code."""
    from audio_separator.separator.roformer.roformer_loader import RoformerLoader
    from audio_separator.separator.uvr_lib_v5.tfc_tdf_v3 import TFC_TDF_net
    from ml_collections import ConfigDict

    torch.manual_seed(seed)
    if "num_subbands" in config["model"]:
        return TFC_TDF_net(ConfigDict(copy.deepcopy(config)), device="cpu").eval()
    result = RoformerLoader().load_model(model_path="/nonexistent.ckpt", config=copy.deepcopy(config), device="cpu")
    assert result.success, result.error_message
    return result.model.eval()


def save_checkpoint(folder: Path, name: str, config: dict[str, Any], seed: int = 0) -> Path:
    """Write `folder/NAME.ckpt` (random weights) and `folder/NAME.yaml`; the weights' path."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.ckpt"
    torch.save(network(config, seed).state_dict(), weights)
    # yaml.dump (not safe_dump) writes tuples as `!!python/tuple`, as the published configs do.
    (folder / f"{name}.yaml").write_text(yaml.dump(config, sort_keys=False))
    return weights
