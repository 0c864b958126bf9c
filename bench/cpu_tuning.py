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
Then how near each comes to the machine's limit: the segment's arithmetic (multiply-adds
of its convolutions, linear layers and attention, counted by PyTorch's FLOP counter) over
its time, against this machine's fp32 matrix-multiply peak on the same threads (a large
square sgemm, the best of three, measured in every round beside the variants; the median
of the rounds); and the share of that peak a variant would need
to reach a given time per segment (`--target`, a ratio to demucs).

    python bench/cpu_tuning.py --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
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
    parser.add_argument("--profile", action="store_true",
                        help="also OpenVINO's own time per kind of operation (its performance counters)")
    parser.add_argument("--target", type=float, default=0.6,
                        help="a time per segment, as a ratio to demucs's, to show the share of peak it needs")
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

    flops = segment_flops(plain, segment)
    outputs = {variant: forward(variant)[1] for variant in variants}  # also warms each up
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    peaks: list[float] = []
    order = list(variants)
    for round_ in range(args.rounds):
        # The peak in every round, beside the variants: other work on the machine moves both.
        peaks.append(sgemm_peak())
        for variant in (order if round_ % 2 == 0 else order[::-1]):
            times[variant].append(forward(variant)[0])
    peak = statistics.median(peaks)

    base = statistics.median(times["demucs"])
    print(f"one {float(plain.segment):.1f}-s segment, htdemucs-sized model, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds (median)")
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"{variant:14} {median:6.3f} s  ratio {median / base:5.3f}  "
              f"SNR to demucs {snr_db(outputs['demucs'].numpy(), outputs[variant].numpy()):6.1f} dB  "
              f"{flops / median / 1e9:5.0f} GFLOP/s = {100 * flops / median / peak:4.1f}% of peak")
    print(f"the segment's arithmetic: {flops / 1e9:.1f} GFLOP; fp32 sgemm peak on {torch.get_num_threads()} "
          f"threads: {peak / 1e9:.0f} GFLOP/s (median of the rounds; {min(peaks) / 1e9:.0f} to "
          f"{max(peaks) / 1e9:.0f}); at that peak a segment would take {flops / peak:.3f} s "
          f"= {flops / peak / base:.3f}x demucs's")
    if args.profile:
        openvino_profile(export, segment_inputs(plain, segment))
    print(f"{args.target:.2f}x demucs's time per segment needs {100 * flops / (args.target * base) / peak:.1f}% "
          f"of the peak, sustained over the whole network")


def segment_flops(model: torch.nn.Module, segment: torch.Tensor) -> int:
    """Floating-point operations (2 per multiply-add) of one forward pass, attention included."""
    from torch.utils import flop_counter

    def attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    # PyTorch counts its CUDA attention kernels; the CPU one has no formula of its own.
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    torch.backends.mha.set_fastpath_enabled(False)  # the fast path's fused op is not counted either
    counter = flop_counter.FlopCounterMode(display=False,
                                           custom_mapping={cpu_attention: attention})
    with torch.inference_mode(), counter:
        model(segment)
    return counter.get_total_flops()


def segment_inputs(model: torch.nn.Module, segment: torch.Tensor) -> list:
    """The exported network's inputs for `segment`: the mix and its magnitude spectrogram."""
    return [segment.numpy(), model._magnitude(model._spec(segment)).numpy()]


def openvino_profile(export: Path, inputs: list) -> None:
    """OpenVINO's milliseconds per kind of operation for one segment (second call: the
    first allocates), from its performance counters."""
    import openvino

    from core.separation.onnx_backend import openvino_settings

    settings = {**openvino_settings(torch.get_num_threads()), "PERF_COUNT": True}  # as stembot runs one stream
    compiled = openvino.Core().compile_model(str(export), "CPU", settings)
    request = compiled.create_infer_request()
    request.infer(inputs)
    request.infer(inputs)
    kinds: dict[str, float] = {}
    for node in request.profiling_info:
        kinds[node.node_type] = kinds.get(node.node_type, 0.0) + node.real_time.total_seconds() * 1e3
    total = sum(kinds.values())
    print(f"OpenVINO, one segment by kind of operation ({total:.0f} ms in its counters; "
          "Subgraph: fused attention and element-wise steps; Reorder, Transpose: moving data between layouts):")
    for kind, ms in sorted(kinds.items(), key=lambda item: -item[1]):
        if ms >= 0.005 * total:
            print(f"  {kind:24} {ms:7.0f} ms  {100 * ms / total:4.1f}%")


def sgemm_peak(size: int = 4096, rounds: int = 3) -> float:
    """FLOP per second of this machine's best fp32 matrix multiply (PyTorch's BLAS) on
    PyTorch's threads: what a network made only of large matrix products would reach."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(rounds))
    return 2 * size**3 / best


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
