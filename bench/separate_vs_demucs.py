"""Benchmark: the same tracks through `stembot separate` and through `python -m demucs`.

Both sides get the same model folder, the same settings (demucs's defaults: shifts=1,
overlap=0.25) and write mp3; demucs is given all files in one invocation, as a user
would. The model is htdemucs-sized (about 42M parameters) with random weights: speed
does not depend on the weights. Prints wall times, real-time factors, their ratio, and
the share of stembot's wall time spent outside the model's forward passes.

    python bench/separate_vs_demucs.py --tracks 5 --seconds 60

`--backends torch onnx openvino` runs one stembot side per CPU backend (`--backend`), all
taking turns with demucs; `--model htdemucs_ft` uses a bag of four htdemucs-sized
per-stem specialists (as htdemucs_ft), and `--stems vocals` asks both sides for vocals
only (demucs: `--two-stems vocals`, which still runs the whole bag; stembot runs the
vocals specialist only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(folder: Path, name: str, seed: int = 0) -> None:
    import torch
    from demucs.htdemucs import HTDemucs

    path = folder / f"{name}.th"
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # htdemucs's published configuration; 41.98M parameters.
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], bottom_channels=512, dconv_mode=3,
                     segment=Fraction(39, 5))
    args, kwargs = model._init_args_kwargs
    torch.save({"klass": model.__class__, "args": args, "kwargs": kwargs, "state": model.state_dict()}, path)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


def bench_model(folder: Path, which: str) -> str:
    """The model a benchmark asks for, made once in `folder`: "htdemucs" (htdemucs-sized,
    random weights) or "tiny" (the tests' model, to check a benchmark quickly). Returns
    its name there."""
    if which == "tiny":
        from tests.support.models import save_th, tiny_htdemucs

        if not (folder / "tiny.th").exists():
            folder.mkdir(parents=True, exist_ok=True)
            save_th(tiny_htdemucs(seed=0), folder, "tiny")
        return "tiny"
    if which == "htdemucs_ft":
        members = [f"htdemucsrand{k}" for k in range(4)]
        for k, member in enumerate(members):
            build_model(folder, member, seed=1 + k)
        identity = [[1.0 if i == k else 0.0 for i in range(4)] for k in range(4)]
        (folder / "htdemucsftrand.yaml").write_text(f"models: {json.dumps(members)}\nweights: {json.dumps(identity)}\n")
        return "htdemucsftrand"
    build_model(folder, "htdemucsrand")
    return "htdemucsrand"


def make_track(path: Path, seconds: float, base: float = 220.0, seed: int = 0) -> Path:
    """A song-like mp3: two tones, pink noise, a pulsing volume (made once, then reused)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([
            "ffmpeg", "-nostdin", "-v", "error", "-y",
            "-f", "lavfi", "-i", f"sine=f={base:g}:d={seconds}",
            "-f", "lavfi", "-i", f"sine=f={base * 1.5:g}:d={seconds}",
            "-f", "lavfi", "-i", f"anoisesrc=d={seconds}:a=0.1:c=pink:seed={seed}",
            "-filter_complex", "[0][1][2]amix=inputs=3,volume=0.6,apulsator=hz=2",
            "-ac", "2", "-ar", "44100", "-c:a", "libmp3lame", "-b:a", "192k", str(path),
        ], check=True)
    return path


def make_tracks(folder: Path, count: int, seconds: float) -> list[Path]:
    return [make_track(folder / f"track{k}-{seconds:g}s.mp3", seconds, base=110 * (k + 2), seed=k)
            for k in range(count)]


def run(cmd: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds, alternating which side goes first (the machine drifts)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="stembot's arithmetic (demucs always runs fp32)")
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=("auto", "torch", "onnx", "openvino"),
                        help="one stembot side per CPU backend")
    parser.add_argument("--model", default="htdemucs", choices=("htdemucs", "htdemucs_ft"))
    parser.add_argument("--stems", default="all", choices=("all", "vocals"))
    args = parser.parse_args()

    models = args.work / "models"
    name = bench_model(models, args.model)
    tracks = make_tracks(args.work / "tracks", args.tracks, args.seconds)
    audio_s = args.tracks * args.seconds
    stats = args.work / "stembot-stats.json"

    def demucs_side() -> float:
        shutil.rmtree(args.work / "demucs", ignore_errors=True)
        stems = ["--two-stems", "vocals"] if args.stems == "vocals" else []
        return run([sys.executable, "-m", "demucs", "--repo", str(models), "-n", name, "--mp3", *stems,
                    "-o", str(args.work / "demucs"), *map(str, tracks)])

    def stembot_side(backend: str) -> Callable[[], float]:
        def go() -> float:
            shutil.rmtree(args.work / "stembot", ignore_errors=True)
            stems = "vocals,no_vocals" if args.stems == "vocals" else "all"
            wall = run([sys.executable, "-m", "stembot", "separate", *map(str, tracks), "--out",
                        str(args.work / "stembot"), "--model", name, "--model-dir", str(models),
                        "--format", "mp3", "--quiet", "--stats", str(stats), "--precision", args.precision,
                        "--backend", backend, "--stems", stems])
            forward[backend].append(json.loads(stats.read_text())["forward_s"])
            return wall
        return go

    sides: list[tuple[str, Callable[[], float]]] = [("demucs", demucs_side)]
    sides += [(f"stembot-{backend}", stembot_side(backend)) for backend in args.backends]
    walls: dict[str, list[float]] = {side: [] for side, _ in sides}
    forward: dict[str, list[float]] = {backend: [] for backend in args.backends}
    for backend in args.backends:  # exports (and auto's probe) once, before any timing
        stembot_side(backend)()
        forward[backend].clear()
    for round_ in range(args.rounds):
        turn = round_ % len(sides)
        for side, go in sides[turn:] + sides[:turn]:
            walls[side].append(go())
            print(f"round {round_ + 1}: {side:16} {walls[side][-1]:7.1f} s", flush=True)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    demucs_wall = mean(walls["demucs"])
    print(f"{args.model}, stems {args.stems}; tracks: {args.tracks} x {args.seconds:.0f} s = "
          f"{audio_s / 60:.1f} min of audio, mp3 320k out, {args.rounds} round(s), means below")
    print(f"python -m demucs         : {demucs_wall:7.1f} s wall, {audio_s / demucs_wall:5.2f}x real time")
    for backend in args.backends:
        wall, forward_s = mean(walls[f"stembot-{backend}"]), mean(forward[backend])
        print(f"stembot separate {backend:8}: ({args.precision}) {wall:7.1f} s wall, {audio_s / wall:5.2f}x real time, "
              f"ratio to demucs {wall / demucs_wall:.3f}; outside forward passes {wall - forward_s:.1f} s "
              f"= {100 * (wall - forward_s) / wall:.1f}% of wall")

if __name__ == "__main__":
    main()
