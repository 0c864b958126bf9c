"""Benchmark: how long a worker takes to be ready (process spawned, model loaded from
local disk, warmed up), for an htdemucs-sized model on this machine.

    python bench/worker_startup.py --runs 3 --backend onnx

With `--backend` other than torch, one unmeasured start first makes the export (and, for
auto, the measured choice), so the runs measure a start with the export cached.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.separate_vs_demucs import build_model
from core.host.handle import HostHandle
from core.host.protocol import HostConfig


async def once(model_dir: Path, name: str, backend: str) -> dict:
    worker = HostHandle(HostConfig(model=name, model_dir=str(model_dir), device="cpu", backend=backend))
    try:
        return await worker.start()
    finally:
        await worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--backend", default="torch", choices=("auto", "torch", "onnx", "openvino"))
    args = parser.parse_args()
    models, name = args.work / "models", "htdemucsrand"
    build_model(models, name)
    if args.backend != "torch":
        asyncio.run(once(models, name, args.backend))
    results = [asyncio.run(once(models, name, args.backend)) for _ in range(args.runs)]
    for key, label in (("start_s", "ready"), ("load_s", "model load"), ("warmup_s", "warm-up")):
        values = [r[key] for r in results]
        print(f"{label:10}: {', '.join(f'{v:.2f}' for v in values)} s (median {statistics.median(values):.2f} s)")
    print(f"backend: {', '.join(sorted({r.get('backend', '?') for r in results}))}")
    print("ready = spawn + imports + load + warm-up, as reported by HostHandle.start()")


if __name__ == "__main__":
    main()
