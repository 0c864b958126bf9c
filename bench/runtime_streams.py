"""Benchmark: one track's forward passes through an ONNX runtime with 1 or more streams
(segments computed at once, each on threads/streams threads), through the engine as
`stembot separate` runs them (demucs's apply_model, shifts=1, overlap 0.25).

    python bench/runtime_streams.py --seconds 60 --rounds 2 --variants openvino:1 openvino:2

Prints, per variant, the seconds of the separation (median of the rounds, the variants
taking turns) and the SNR of its output to the first variant's (rounding only: the
shifts are seeded alike).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from bench.separate_vs_demucs import bench_model
from core.separation import catalogue, onnx_backend
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import StemRequest
from tests.support.media import snr_db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--model", default="htdemucs", choices=("htdemucs", "tiny"))
    parser.add_argument("--variants", nargs="+", default=["openvino:1", "openvino:2"], help="RUNTIME:STREAMS")
    args = parser.parse_args()
    models = args.work / "models"
    name = bench_model(models, args.model)
    threads = torch.get_num_threads()
    engines: dict[str, SeparationEngine] = {}
    for variant in args.variants:
        runtime, streams = variant.split(":")
        started = time.monotonic()
        exports = onnx_backend.default_export_dir(models)
        model, _ = onnx_backend.prepare(catalogue.load(name, models), runtime, exports, threads, int(streams))
        engines[variant] = SeparationEngine(model, name, torch.device("cpu"))
        print(f"{variant}: prepared in {time.monotonic() - started:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    mix = (0.1 * rng.standard_normal((2, int(44100 * args.seconds)))).astype(np.float32)
    request = StemRequest(("drums", "bass", "other", "vocals"))
    times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for round_ in range(args.rounds):
        turn = round_ % len(args.variants)
        for variant in args.variants[turn:] + args.variants[:turn]:
            random.seed(round_)  # apply_model's shifts
            started = time.monotonic()
            outputs[variant] = engines[variant].separate(mix, request, SeparationOptions(shifts=1))
            times[variant].append(time.monotonic() - started)
            print(f"round {round_ + 1}: {variant:12} {times[variant][-1]:6.1f} s", flush=True)
    first = args.variants[0]
    for variant in args.variants:
        snr = min(snr_db(outputs[first][stem], outputs[variant][stem]) for stem in request.outputs)
        print(f"{variant:12}: median {statistics.median(times[variant]):6.1f} s over {args.rounds} rounds "
              f"({threads} threads); SNR to {first}: {snr:.1f} dB")


if __name__ == "__main__":
    main()
