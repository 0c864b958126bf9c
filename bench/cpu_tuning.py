"""Benchmark: the CPU speed-ups of core.separation.engine.tune_for_cpu, one by one, side by side.

Times one forward pass of an htdemucs-sized model (42M parameters, random weights: speed
does not depend on the weights) on one 7.8-s segment, in one process, rounds alternating
the order of the variants:

- demucs: as `python -m demucs` runs it (inference mode, PyTorch's defaults);
- no-fastpath: without PyTorch's multi-head-attention fast path;
- channels-last: with channels-last weights;
- tuned: both (what stembot runs on a CPU);
- tuned+bf16: both, under bf16 autocast (opt-in STEMBOT_PRECISION=bf16);
- onnx, openvino: the network exported once (core.separation.onnx_backend) and run by ONNX
  Runtime or OpenVINO in fp32, demucs's STFT and iSTFT around it (`--runtimes` to choose).

Prints the median time of each, its ratio to demucs, and its SNR against demucs's output.

    python bench/cpu_tuning.py --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.separate_vs_demucs import build_model
from tests.support.media import snr_db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--runtimes", nargs="*", default=["onnx", "openvino"], choices=("onnx", "openvino"))
    parser.add_argument("--skip", nargs="*", default=[], help="PyTorch variants to leave out")
    args = parser.parse_args()

    from demucs.pretrained import get_model

    models, name = args.work / "models", "htdemucsrand"
    build_model(models, name)
    plain = get_model(name, repo=models).eval()
    tuned = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    segment = 0.1 * torch.randn(1, 2, int(plain.samplerate * float(plain.segment)))

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    # name: (model, attention fast path, autocast)
    variants = {
        "demucs": (plain, True, nullcontext),
        "no-fastpath": (plain, False, nullcontext),
        "channels-last": (tuned, True, nullcontext),
        "tuned": (tuned, False, nullcontext),
        "tuned+bf16": (tuned, False, bf16),
    }
    for skipped in args.skip:
        variants.pop(skipped)
    from core.separation import onnx_backend

    export = onnx_backend.cached_export(copy.deepcopy(plain), args.work / "exports")
    for runtime in args.runtimes:
        net = onnx_backend.RUNNERS[runtime](export, torch.get_num_threads(), 1)
        variants[runtime] = (onnx_backend.ExportedHTDemucs(plain, net, runtime), False, nullcontext)

    def forward(variant: str) -> tuple[float, torch.Tensor]:
        model, fastpath, autocast = variants[variant]
        torch.backends.mha.set_fastpath_enabled(fastpath)
        with torch.inference_mode(), autocast():
            started = time.perf_counter()
            out = model(segment)
            return time.perf_counter() - started, out.float()

    outputs = {variant: forward(variant)[1] for variant in variants}  # also warms each up
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    order = list(variants)
    for round_ in range(args.rounds):
        for variant in (order if round_ % 2 == 0 else order[::-1]):
            times[variant].append(forward(variant)[0])

    base = statistics.median(times["demucs"])
    print(f"one {float(plain.segment):.1f}-s segment, htdemucs-sized model, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds (median)")
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"{variant:14} {median:6.3f} s  ratio {median / base:5.3f}  "
              f"SNR to demucs {snr_db(outputs['demucs'].numpy(), outputs[variant].numpy()):6.1f} dB")


if __name__ == "__main__":
    main()
