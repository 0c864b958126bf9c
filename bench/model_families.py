"""Model families side by side on this machine: htdemucs, BS-RoFormer, Mel-Band RoFormer, MDX23C.

Each network is built at its published size with random weights (speed does not depend on
the weights) and run through stembot's own engine on the same clip, with the chunk and
overlap settings its published YAML gives (htdemucs: stembot's defaults, shifts 1, overlap
0.25). Printed per family: parameters, seconds, the real-time factor (audio seconds per
second), the cost factor it implies (its seconds over htdemucs's: what a job is charged per
audio minute, core/separation/published.py), and the SNR of bf16 against fp32 on the same
clip's first seconds (a random network's outputs: a measure of the precision, not of quality).

    python bench/model_families.py --seconds 20 --json results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.separation.checkpoint_engine import CheckpointEngine
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import parse_stems

# The published configs' `audio`/`model`/`inference` settings (training and augmentation left out).
_BS_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
_ROFORMER_STFT = {"dim_freqs_in": 1025, "stft_n_fft": 2048, "stft_hop_length": 441, "stft_win_length": 2048,
                  "stft_normalized": False, "mask_estimator_depth": 2, "multi_stft_resolution_loss_weight": 1.0,
                  "multi_stft_resolutions_window_sizes": (4096, 2048, 1024, 512, 256), "multi_stft_hop_size": 147,
                  "multi_stft_normalized": False}
FAMILIES: dict[str, dict[str, Any]] = {
    # viperx's model_bs_roformer_ep_317_sdr_12.9755.yaml
    "bs_roformer": {
        "audio": {"chunk_size": 352800, "dim_f": 1024, "dim_t": 801, "hop_length": 441, "n_fft": 2048,
                  "num_channels": 2, "sample_rate": 44100},
        "model": {"dim": 512, "depth": 12, "stereo": True, "num_stems": 1, "time_transformer_depth": 1,
                  "freq_transformer_depth": 1, "freqs_per_bands": _BS_BANDS, "dim_head": 64, "heads": 8,
                  "attn_dropout": 0.1, "ff_dropout": 0.1, "flash_attn": True, **_ROFORMER_STFT},
        "training": {"instruments": ["Vocals", "Instrumental"], "target_instrument": "Vocals"},
        "inference": {"batch_size": 1, "dim_t": 801, "num_overlap": 4},
    },
    # Kimberley Jensen's Mel-Band RoFormer vocals config (TRvlvr's config_vocals_mel_band_roformer_kim.yaml)
    "mel_band_roformer": {
        "audio": {"chunk_size": 352800, "dim_f": 1024, "dim_t": 256, "hop_length": 441, "n_fft": 2048,
                  "num_channels": 2, "sample_rate": 44100},
        "model": {"dim": 384, "depth": 6, "stereo": True, "num_stems": 1, "time_transformer_depth": 1,
                  "freq_transformer_depth": 1, "num_bands": 60, "dim_head": 64, "heads": 8, "attn_dropout": 0,
                  "ff_dropout": 0, "flash_attn": True, "sample_rate": 44100, **_ROFORMER_STFT},
        "training": {"instruments": ["Vocals", "Instrumental"], "target_instrument": "Vocals"},
        "inference": {"batch_size": 1, "dim_t": 1101, "num_overlap": 1},
    },
    # aufr33 & jarredou's MDX23C de-reverb (config_dereverb_mdx23c.yaml), the 8K-FFT TFC-TDF v3 of InstVoc HQ
    "mdx23c": {
        "audio": {"chunk_size": 261120, "dim_f": 4096, "dim_t": 256, "hop_length": 1024, "n_fft": 8192,
                  "num_channels": 2, "sample_rate": 44100},
        "model": {"act": "gelu", "bottleneck_factor": 4, "growth": 128, "norm": "InstanceNorm",
                  "num_blocks_per_scale": 2, "num_channels": 128, "num_scales": 5, "num_subbands": 4,
                  "scale": [2, 2]},
        "training": {"instruments": ["No Reverb", "Reverb"], "target_instrument": None},
        "inference": {"batch_size": 1, "dim_t": 256, "num_overlap": 4},
    },
}


def clip(seconds: float, rate: int = 44100) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.2 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))
    left = tone + 0.05 * rng.standard_normal(t.size)
    return np.stack([left, 0.9 * left + 0.02 * rng.standard_normal(t.size)]).astype(np.float32)


def save_htdemucs(folder: Path) -> None:
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(0)
    # htdemucs's published configuration; 41.98M parameters.
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], bottom_channels=512, dconv_mode=3,
                     segment=Fraction(39, 5))
    args, kwargs = model._init_args_kwargs
    torch.save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": model.state_dict()},
               folder / "htdemucs.th")


def save_checkpoint(folder: Path, family: str) -> None:
    from audio_separator.separator.roformer.roformer_loader import RoformerLoader
    from audio_separator.separator.uvr_lib_v5.tfc_tdf_v3 import TFC_TDF_net
    from ml_collections import ConfigDict

    config = FAMILIES[family]
    torch.manual_seed(0)
    if family == "mdx23c":
        network = TFC_TDF_net(ConfigDict(copy.deepcopy(config)), device="cpu")
    else:
        result = RoformerLoader().load_model(model_path="/nonexistent.ckpt", config=copy.deepcopy(config))
        assert result.success, result.error_message
        network = result.model
    torch.save(network.state_dict(), folder / f"{family}.ckpt")
    (folder / f"{family}.yaml").write_text(yaml.dump(config, sort_keys=False))


def measure(engine: SeparationEngine, mix: np.ndarray, options: SeparationOptions) -> tuple[dict, float]:
    request = parse_stems("all", engine.sources)
    started = time.perf_counter()
    stems = engine.separate(mix, request, options)
    return stems, time.perf_counter() - started


def snr(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = float(np.sum((reference - estimate) ** 2))
    return 10 * float(np.log10(float(np.sum(reference ** 2)) / max(noise, 1e-20)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--families", default="htdemucs,bs_roformer,mel_band_roformer,mdx23c")
    parser.add_argument("--bf16-seconds", type=float, default=8.0,
                        help="bf16 against fp32 on the clip's first this many seconds (0: skip)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mix = clip(args.seconds)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for family in args.families.split(","):
            if family == "htdemucs":
                save_htdemucs(folder)
            else:
                save_checkpoint(folder, family)
            engine = SeparationEngine.load(family, folder, "cpu")
            network = engine.network if isinstance(engine, CheckpointEngine) else engine.model
            params = sum(p.numel() for p in network.parameters())
            options = SeparationOptions(shifts=1 if family == "htdemucs" else 0)
            measure(engine, mix[:, :44100], options)  # warm-up: lazy set-up, one chunk
            full, seconds = measure(engine, mix, options)
            row: dict[str, Any] = {"family": family, "params_m": round(params / 1e6, 2), "seconds": round(seconds, 2),
                                   "rtf": round(args.seconds / seconds, 3)}
            if args.bf16_seconds:
                # shifts=0 on both sides so that only the precision differs.
                part = mix[:, :int(args.bf16_seconds * 44100)]
                exact, _ = measure(engine, part, SeparationOptions(shifts=0))
                half, _ = measure(engine, part, SeparationOptions(shifts=0, precision="bf16"))
                row["bf16_snr_db"] = round(min(snr(exact[name], half[name]) for name in exact), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((row["seconds"] for row in rows if row["family"] == "htdemucs"), None)
    print(f"\n{'family':18} {'params (M)':>10} {'seconds':>8} {'x real time':>11} {'cost factor':>11} {'bf16 SNR':>9}")
    for row in rows:
        row["cost_factor"] = round(row["seconds"] / base, 2) if base else None
        print(f"{row['family']:18} {row['params_m']:>10} {row['seconds']:>8} {row['rtf']:>11} "
              f"{row['cost_factor']!s:>11} {row.get('bf16_snr_db', '-')!s:>9}")
    if args.json is not None:
        args.json.write_text(json.dumps({"seconds": args.seconds, "threads": torch.get_num_threads(), "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
