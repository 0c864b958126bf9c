"""Benchmark: peak memory of separating a long track, whole-track path vs blocks (CPU).

Each case runs the model host's job path (`SerialHost.separate`: probe, decode, separate,
encode to mp3, preview) in a fresh process, and reports that process's resident-memory
high-water mark (VmHWM; ffmpeg's own processes are not in it). Cases:

- short, auto: a `--short-min` track; at or below `blocks_above_s` it takes the
  whole-track path, as every ordinary song does;
- long, auto: a `--long-min` track, which goes blockwise;
- short, blocks: the short track forced through blocks (`--short-blocks`);
- long, whole: the long track through the whole-track path (`--long-whole`; needs RAM).

The target: long (auto) peak <= 1.5x short (auto) peak. The model is htdemucs-sized
(42M parameters, random weights; memory and speed do not depend on the weights) or,
to check the benchmark itself quickly, the tests' tiny model (`--model tiny`).

    python bench/long_tracks.py --model tiny --short-min 3 --long-min 30 --long-whole
    nice -n 10 python bench/long_tracks.py --overlap 0.1     # htdemucs-sized: about 1 hour
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> None:
    """One case, in this (fresh) process; prints one JSON line."""

    from core.host.protocol import HostConfig, JobSpec
    from core.host.serial_host import SerialHost
    from core.host.steps import JobSteps

    class Events:
        def __init__(self):
            self.items = []

        def put(self, item):
            self.items.append(item)

    extra = {} if spec["blocks"] == "auto" else {"blocks_above_s": 0.0} if spec["blocks"] == "on" \
        else {"block_s": None}
    config = HostConfig(model=spec["model"], model_dir=spec["model_dir"], device="cpu", shifts=spec["shifts"],
                        overlap=spec["overlap"], max_duration_s=4 * 3600.0, max_input_bytes=2**40, **extra)
    steps = JobSteps(config, Events(), set(), os.getppid())
    steps.boot()
    host = SerialHost(steps)
    loaded = _vm("VmHWM")
    started = time.monotonic()
    result = host.separate(JobSpec(job_id=1, input_path=spec["input"], stems_dir=spec["out"], model=spec["model"],
                                    stems="all", format="mp3", attachment_limit=2**40))
    wall = time.monotonic() - started
    blocked = any(p.name.startswith(".") for p in Path(spec["out"]).parent.iterdir())
    print(json.dumps({"peak": _vm("VmHWM"), "after_load": loaded, "wall_s": wall,
                      "separation_s": result.separation_s, "duration_s": result.duration_s,
                      "leftovers": blocked}), flush=True)


def run_case(label: str, spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"{label:22} peak {figures['peak'] / mib:7.0f} MiB (model loaded: {figures['after_load'] / mib:5.0f}), "
          f"{figures['duration_s'] / 60:5.1f} min of audio "
          f"in {figures['wall_s']:6.0f} s (separation {figures['separation_s']:.0f} s, "
          f"{figures['duration_s'] / figures['separation_s']:.2f}x real time)", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("htdemucs", "tiny"), default="htdemucs")
    parser.add_argument("--short-min", type=float, default=3.0)
    parser.add_argument("--long-min", type=float, default=30.0)
    parser.add_argument("--shifts", type=int, default=1, help="the service's default is 1")
    parser.add_argument("--overlap", type=float, default=0.25, help="the service's default is 0.25")
    parser.add_argument("--short-blocks", action="store_true", help="also the short track forced through blocks")
    parser.add_argument("--long-whole", action="store_true", help="also the long track through the whole-track path")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "long_tracks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    from core.separation.blockwise import BLOCK_S, BLOCKS_ABOVE_S

    models = args.work / "models"
    from bench.separate_vs_demucs import bench_model, make_track

    name = bench_model(models, args.model)

    short = make_track(args.work / "tracks" / f"{args.short_min:g}min.mp3", args.short_min * 60, seed=1)
    long = make_track(args.work / "tracks" / f"{args.long_min:g}min.mp3", args.long_min * 60, seed=1)
    print(f"model {args.model} ({name}), shifts={args.shifts}, overlap={args.overlap}, CPU, "
          f"blocks of {BLOCK_S:g} s above {BLOCKS_ABOVE_S:g} s, mp3 out with preview", flush=True)

    def spec(track: Path, blocks: str, tag: str) -> dict:
        return {"model": name, "model_dir": str(models), "input": str(track), "blocks": blocks,
                "shifts": args.shifts, "overlap": args.overlap, "out": str(args.work / "jobs" / tag / "stems")}

    results = {"short": run_case(f"{args.short_min:g} min, auto", spec(short, "auto", "short")),
               "long": run_case(f"{args.long_min:g} min, auto", spec(long, "auto", "long"))}
    if args.short_blocks:
        results["short_blocks"] = run_case(f"{args.short_min:g} min, blocks", spec(short, "on", "short_blocks"))
    if args.long_whole:
        results["long_whole"] = run_case(f"{args.long_min:g} min, whole track", spec(long, "off", "long_whole"))
    ratio = results["long"]["peak"] / results["short"]["peak"]
    print(f"peak ratio {args.long_min:g} min / {args.short_min:g} min: {ratio:.2f}x (target <= 1.5x)")
    if "long_whole" in results:
        print(f"whole-track path would peak at {results['long_whole']['peak'] / results['long']['peak']:.1f}x "
              f"the blocks' for {args.long_min:g} min")
    if any(r["leftovers"] for r in results.values()):
        print("WARNING: work folders were left behind")
    (args.work / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         **results}, indent=1))


if __name__ == "__main__":
    main()
