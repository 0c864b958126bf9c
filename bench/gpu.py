"""GPU benchmark: cross-track batching, mixed precision, and real-time factors.

Runs on a CUDA machine (CI never does). The model is htdemucs-sized (about 42M
parameters) with random weights: speed does not depend on the weights, and quality is
compared between precisions of the same model, not against references.

Compared side by side in one run, on the same GPU:
- demucs's own path: `apply_model` one track after another (what `python -m demucs`
  does for separation, given all files in one invocation), shifts=1, overlap 0.25;
- stembot: the same tracks through `SeparationEngine.separate_many` (segments of all
  tracks batched into shared forward passes), same settings.
File decoding and encoding are left out of both sides: they run on the CPU beside the
GPU in stembot's pipeline.

    python bench/gpu.py --tracks 8 --seconds 240
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import parse_stems


def build_model():
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(0)
    # htdemucs's published configuration; 41.98M parameters.
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], bottom_channels=512, dconv_mode=3,
                     segment=Fraction(39, 5))
    return model.eval()


def make_tracks(count: int, seconds: float, rate: int = 44100) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    tracks = []
    for k in range(count):
        tone = 0.2 * np.sin(2 * np.pi * (110 * (k + 2)) * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))
        noise = 0.05 * rng.standard_normal(t.size)
        left = tone + noise
        tracks.append(np.stack([left, 0.9 * left + 0.02 * rng.standard_normal(t.size)]).astype(np.float32))
    return tracks


def sync_time(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def demucs_path(model, tracks, device, shifts, overlap):
    """demucs's Separator.separate_tensor, one track after another."""
    from demucs.apply import apply_model

    outs = []
    for mix in tracks:
        wav = torch.from_numpy(mix)
        ref = wav.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        out = apply_model(model, ((wav - mean) / std)[None], shifts=shifts, overlap=overlap, device=device)
        outs.append((out * std + mean)[0].numpy())
    return outs


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = float(np.sum((reference - estimate) ** 2))
    return 10 * np.log10(float(np.sum(reference ** 2)) / max(noise, 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cpu-smoke-test", action="store_true", help="check the script on a CPU (tiny sizes)")
    args = parser.parse_args()
    if not args.cpu_smoke_test:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    report: dict = {"gpu": name, "torch": torch.__version__,
                    "tracks": args.tracks, "seconds": args.seconds}
    print(f"{report['gpu']}, torch {torch.__version__}; {args.tracks} tracks x {args.seconds:.0f} s", flush=True)

    model = build_model()
    engine = SeparationEngine(model, "htdemucs-random", device)
    request = parse_stems("all", engine.sources)
    tracks = make_tracks(args.tracks, args.seconds)
    audio_s = args.tracks * args.seconds
    engine.separate(tracks[0][:, :44100 * 10], request, SeparationOptions(shifts=0))  # warm-up

    # 1. One track: real-time factor, demucs's path against stembot's engine.
    _, one_demucs = sync_time(lambda: demucs_path(model, tracks[:1], device, 1, 0.25))
    _, one_ours = sync_time(lambda: engine.separate(tracks[0], request, SeparationOptions(shifts=1)))
    report["one_track"] = {"demucs_s": one_demucs, "stembot_s": one_ours,
                           "demucs_rtf": args.seconds / one_demucs, "stembot_rtf": args.seconds / one_ours}
    print(f"one {args.seconds:.0f} s track: demucs {one_demucs:.2f} s ({args.seconds / one_demucs:.0f}x real time), "
          f"stembot {one_ours:.2f} s ({args.seconds / one_ours:.0f}x)", flush=True)

    # 2. Many tracks: throughput, demucs one after another against stembot batched.
    _, many_demucs = sync_time(lambda: demucs_path(model, tracks, device, 1, 0.25))
    report["many"] = {"demucs_s": many_demucs, "demucs_jobs_per_min": 60 * args.tracks / many_demucs}
    print(f"{args.tracks} tracks, demucs path: {many_demucs:.2f} s = {60 * args.tracks / many_demucs:.1f} jobs/min",
          flush=True)
    for batch in args.batch:
        _, ours = sync_time(lambda batch=batch: engine.separate_many(tracks, request, SeparationOptions(shifts=1),
                                                                      batch_size=batch))
        report["many"][f"stembot_batch{batch}_s"] = ours
        print(f"{args.tracks} tracks, stembot batch {batch}: {ours:.2f} s = {60 * args.tracks / ours:.1f} jobs/min, "
              f"{many_demucs / ours:.2f}x demucs's throughput, {audio_s / ours:.0f}x real time", flush=True)

    # 3. Identical results: batched vs one at a time, without random shifts.
    exact = SeparationOptions(shifts=0)
    batched = engine.separate_many(tracks[:3], request, exact, batch_size=16)
    alone = [engine.separate(m, request, exact) for m in tracks[:3]]
    worst = max(float(np.max(np.abs(b[s] - a[s]))) for b, a in zip(batched, alone, strict=True) for s in a)
    report["batched_max_abs_diff"] = worst
    print(f"batched vs one at a time (shifts=0): max abs difference {worst:.2e}", flush=True)

    # 4. Mixed precision: speed and SNR against fp32, on the same tracks.
    _, fp32_s = sync_time(lambda: engine.separate_many(tracks, request, exact, batch_size=16))
    reference = engine.separate_many(tracks[:2], request, exact, batch_size=16)
    report["precision"] = {"fp32_s": fp32_s}
    for precision in ("bf16", "fp16"):
        options = SeparationOptions(shifts=0, precision=precision)
        try:
            _, took = sync_time(lambda options=options: engine.separate_many(tracks, request, options, batch_size=16))
            low = engine.separate_many(tracks[:2], request, options, batch_size=16)
        except Exception as exc:  # noqa: BLE001 - report what broke and go on
            print(f"{precision}: failed: {exc!r}", flush=True)
            report["precision"][precision] = {"error": repr(exc)}
            continue
        snrs = [snr_db(r[s], lo[s]) for r, lo in zip(reference, low, strict=True) for s in r]
        report["precision"][precision] = {"seconds": took, "speedup": fp32_s / took, "snr_min_db": min(snrs),
                                          "snr_mean_db": float(np.mean(snrs))}
        print(f"{precision}: {took:.2f} s ({fp32_s / took:.2f}x fp32), SNR vs fp32 min {min(snrs):.1f} dB, "
              f"mean {np.mean(snrs):.1f} dB", flush=True)
    report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    print(f"peak GPU memory {report['peak_memory_gib']:.1f} GiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
