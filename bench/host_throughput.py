"""Benchmark: jobs per minute of the model host with concurrent jobs, against `python -m demucs`.

Files in, mp3 stems out on both sides. demucs gets all tracks in one invocation (as a
user would run it); stembot's side is the real `HostHandle` with its spawned model host
(already started and warmed up, as a running bot's is), given all tracks at once as
concurrent jobs, once per `--batch-jobs` value (1: one job at a time; more: jobs decode
and encode in threads while their segments share forward passes). Same model folder,
same settings (shifts=1, overlap 0.25), same device. The model is htdemucs-sized with
random weights (speed does not depend on the weights).

    python bench/host_throughput.py --tracks 8 --seconds 240 --batch-jobs 1 4 8      # on a GPU
    python bench/host_throughput.py --tracks 2 --seconds 20 --batch-jobs 1 2 --model tiny   # a quick check
    python bench/host_throughput.py --tracks 1 --seconds 60 --batch-jobs 1 --backends torch openvino  # one request, CPU
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.separate_vs_demucs import bench_model, make_tracks, run
from core.host.handle import HostHandle
from core.host.protocol import DoneEvent, HostConfig, JobSpec


async def host_side(models: Path, name: str, device: str, batch_jobs: int, tracks: list[Path], out: Path,
                    segments: int, backend: str = "torch") -> tuple[float, float, int, float]:
    """(wall of all jobs, real-time factor of the first job, most jobs in one pass, seconds
    of the first job outside its separation: decode, encodes, tempo/key analysis)."""
    worker = HostHandle(HostConfig(model=name, model_dir=str(models), device=device, batch_jobs=batch_jobs,
                                    batch_segments=segments, max_duration_s=3600.0, backend=backend))
    await worker.start()
    try:
        specs = [JobSpec(job_id=k + 1, input_path=str(track), stems_dir=str(out / f"job{k + 1}"), model=name,
                         stems="all", format="mp3", attachment_limit=2**40, preview=False)
                 for k, track in enumerate(tracks)]
        started = time.monotonic()
        results = await asyncio.gather(*(worker.run(spec) for spec in specs))
        wall = time.monotonic() - started
    finally:
        await worker.stop()
    done = [r.result for r in results if isinstance(r, DoneEvent)]
    if len(done) != len(results):
        sys.exit(f"stembot jobs failed: {[r for r in results if not isinstance(r, DoneEvent)]}")
    first = done[0]
    outside = wall - first.separation_s if len(done) == 1 else float("nan")
    return wall, first.duration_s / first.separation_s, max(r.batched_jobs or 1 for r in done), outside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--batch-jobs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--segments", type=int, default=16, help="segments per forward pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backends", nargs="+", default=["torch"], choices=("auto", "torch", "onnx", "openvino"),
                        help="what runs the network on a CPU: one host per backend, each measured in turn")
    parser.add_argument("--model", default="htdemucs", choices=("htdemucs", "tiny"),
                        help="htdemucs-sized random weights, or the tests' tiny model")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()

    models = args.work / "models"
    name = bench_model(models, args.model)
    tracks = make_tracks(args.work / "tracks", args.tracks, args.seconds)
    audio_s = args.tracks * args.seconds
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    out = args.work / "demucs"
    shutil.rmtree(out, ignore_errors=True)
    demucs_wall = run([sys.executable, "-m", "demucs", "--repo", str(models), "-n", name, "--mp3", "-d", device,
                       "-o", str(out), *map(str, tracks)])
    print(f"{args.tracks} x {args.seconds:.0f} s on {device}; python -m demucs: {demucs_wall:.1f} s = "
          f"{60 * args.tracks / demucs_wall:.1f} jobs/min, {audio_s / demucs_wall:.1f}x real time", flush=True)
    for backend in args.backends:
        for batch_jobs in args.batch_jobs:
            out = args.work / "host"
            shutil.rmtree(out, ignore_errors=True)
            wall, first_rtf, shared, outside = asyncio.run(
                host_side(models, name, device, batch_jobs, tracks, out, args.segments, backend))
            print(f"stembot host ({backend}), {batch_jobs} job(s) at once: {wall:.1f} s = "
                  f"{60 * args.tracks / wall:.1f} jobs/min, {demucs_wall / wall:.2f}x demucs's throughput, "
                  f"wall {wall / demucs_wall:.3f}x demucs's; first job separated at {first_rtf:.1f}x real time; "
                  f"up to {shared} jobs in one forward pass", flush=True)
            if args.tracks == 1:
                print(f"  outside the separation (decode, encodes, tempo/key analysis, events): {outside:.1f} s "
                      f"= {100 * outside / wall:.1f}% of the job's wall", flush=True)


if __name__ == "__main__":
    main()
