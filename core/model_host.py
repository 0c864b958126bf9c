"""The model host: a spawned child process that owns the Demucs model.

It loads the model once, warms it up, then runs jobs one at a time: decode -> separate
-> encode, reporting each stage and the progress on an event queue. It is started with
the `spawn` method (never `fork` a process that may touch CUDA) and exits by itself
when its parent dies, so a killed bot leaves no orphan holding the GPU.
"""

from __future__ import annotations

import logging
import os
import queue
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .blockwise import BLOCK_S, BLOCKS_ABOVE_S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostConfig:
    """What the host needs to start; plain data, so it pickles across `spawn`."""

    model: str
    model_dir: str | None
    device: str = "auto"
    shifts: int = 1
    overlap: float = 0.25
    segment: float | None = None
    precision: str = "fp32"
    min_duration_s: float = 1.0
    max_duration_s: float = 20 * 60
    max_input_bytes: int = 250 * 1024 * 1024
    warm_up: bool = True
    max_loaded_models: int = 2
    # CPU threads for the model (None: PyTorch's default, every core). Several model
    # hosts on one machine must share the cores: oversubscribed, PyTorch's spinning
    # threads slowed two 2-thread hosts on 2 cores about 7x (bench/workers.py).
    threads: int | None = None
    # Tracks longer than `blocks_above_s` are decoded, separated and encoded in blocks of
    # `block_s` seconds, in bounded memory (core.blockwise); None: always whole tracks.
    block_s: float | None = BLOCK_S
    blocks_above_s: float = BLOCKS_ABOVE_S
    # Added to the host's niceness: on a shared CPU the bot's event loop (and a worker's
    # heartbeats) then run first, and the separation takes what is left.
    nice: int = 0
    log_level: int = logging.INFO


@dataclass(frozen=True)
class JobSpec:
    """One separation, as the host receives it."""

    job_id: int
    input_path: str
    stems_dir: str
    model: str
    stems: str
    format: str
    mp3_bitrate_kbps: int = 320
    attachment_limit: int = 10 * 1024 * 1024
    links_available: bool = False
    link_valid_hours: float = 24.0
    preview: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def host_main(config: HostConfig, requests, events, cancel_job) -> None:
    """Entry point of the child process. `cancel_job` is a shared integer: the id of the
    job to stop (0 for none)."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s model-host: %(message)s")
    parent = os.getppid()
    _die_with_parent(parent)
    if config.nice:
        os.nice(config.nice)
    host = _Host(config, events, cancel_job, parent)
    try:
        host.boot()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        events.put({"type": "fatal", "reason": _reason(exc), "kind": getattr(exc, "kind", "error")})
        return
    while True:
        try:
            message = requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return  # the bot died; nobody will read our results
            continue
        if message is None:
            return
        host.run(JobSpec(**message))


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the bot dies, even mid-separation (Linux);
    elsewhere the host notices between segments and between jobs."""
    try:
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the bot died before the line above took effect
        os._exit(0)


def _reason(exc: BaseException) -> str:
    from .errors import StembotError

    if isinstance(exc, StembotError):
        return exc.reason
    return f"internal error ({exc.__class__.__name__})"


class _Host:
    def __init__(self, config: HostConfig, events, cancel_job, parent: int):
        self.config = config
        self.parent = parent
        self.events = events
        self.cancel_job = cancel_job
        self.engines: dict[str, Any] = {}

    def boot(self) -> None:
        started = time.monotonic()
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        engine = self.engine(self.config.model)
        loaded = time.monotonic()
        if self.config.warm_up:
            engine.warm_up()
        self.events.put({
            "type": "ready", "model": self.config.model, "device": str(engine.device), "pid": os.getpid(),
            "load_s": loaded - started, "warmup_s": time.monotonic() - loaded,
        })

    def engine(self, name: str):
        from .separation import SeparationEngine

        if name in self.engines:
            self.engines[name] = self.engines.pop(name)  # most recently used last
            return self.engines[name]
        while len(self.engines) >= self.config.max_loaded_models:
            self.engines.pop(next(iter(self.engines)))
        model_dir = Path(self.config.model_dir) if self.config.model_dir else None
        engine = SeparationEngine.load(name, model_dir, self.config.device)
        self.engines[name] = engine
        return engine

    def run(self, spec: JobSpec) -> None:
        from .errors import JobCancelled

        job = spec.job_id
        try:
            result = self._separate(spec)
        except JobCancelled:
            self.events.put({"type": "cancelled", "job": job})
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the host lives on
            if not hasattr(exc, "reason"):
                log.error("job %s failed:\n%s", job, traceback.format_exc())
            self.events.put({"type": "failed", "job": job, "reason": _reason(exc),
                             "kind": getattr(exc, "kind", "error")})
        else:
            self.events.put({"type": "done", "job": job, **result})

    def _cancelled(self, job_id: int) -> bool:
        if os.getppid() != self.parent:
            os._exit(0)  # the bot is gone: nobody will read the result
        return self.cancel_job.value == job_id

    def _stage(self, job_id: int, stage: str, **extra) -> None:
        from .errors import JobCancelled

        if self._cancelled(job_id):
            raise JobCancelled()
        self.events.put({"type": "stage", "job": job_id, "stage": stage, **extra})

    def _separate(self, spec: JobSpec) -> dict:
        import shutil

        from . import blockwise
        from .audio import Limits, OutputFormat, decode, probe
        from .delivery import fits, links_note, plan_delivery, too_large_error
        from .pipeline import write_track
        from .separation import SeparationOptions
        from .stems import parse_stems

        job = spec.job_id
        config = self.config
        limits = Limits(config.min_duration_s, config.max_duration_s, config.max_input_bytes)
        self._stage(job, "decoding")
        engine = self.engine(spec.model)
        request = parse_stems(spec.stems, engine.sources)
        input_path = Path(spec.input_path)
        stems_dir = Path(spec.stems_dir)
        info = probe(input_path, limits)
        work = staged = None
        try:
            if blockwise.use_blocks(info.duration_s, config.block_s, config.blocks_above_s):
                # Long, or of unknown length: decoded to disk, and kept there if long.
                work = blockwise.work_dir(stems_dir.parent, stems_dir.name)
                staged = blockwise.stage_input(input_path, engine, limits, work, info)
                if staged.duration_s <= config.blocks_above_s:
                    mix, staged = staged.load(), None
                    shutil.rmtree(work, ignore_errors=True)
                    work = None
            else:
                mix = decode(input_path, engine.samplerate, engine.audio_channels, limits, info)
            duration = (staged.frames if staged else mix.shape[1]) / engine.samplerate

            self._stage(job, "separating", duration_s=duration)
            last_sent = [0.0]

            def progress(fraction: float) -> None:
                now = time.monotonic()
                # The queue is cheap, but the bot only shows an update every ~2 s anyway.
                if now - last_sent[0] >= 0.5 or fraction >= 1.0:
                    last_sent[0] = now
                    self.events.put({"type": "progress", "job": job, "fraction": fraction})

            started = time.monotonic()
            options = SeparationOptions(config.shifts, config.overlap, config.segment, config.precision)
            if staged is not None:
                stems = blockwise.separate_staged(staged, engine, request, options, work, progress=progress,
                                                  should_cancel=lambda: self._cancelled(job),
                                                  block_s=config.block_s)
                staged.path.unlink()
                names = stems.names
            else:
                stems = engine.separate(mix, request, options, progress=progress,
                                        should_cancel=lambda: self._cancelled(job))
                del mix
                names = list(stems)
            separation_s = time.monotonic() - started

            self._stage(job, "encoding")
            requested = OutputFormat(name=spec.format, mp3_bitrate_kbps=spec.mp3_bitrate_kbps)
            plan = plan_delivery(requested, duration, len(names), spec.attachment_limit, spec.links_available,
                                 link_valid_hours=spec.link_valid_hours)
            shutil.rmtree(stems_dir, ignore_errors=True)  # a retry starts clean
            if staged is not None:
                folder = blockwise.write_staged(stems, stems_dir.parent, stems_dir.name, plan.format)
            else:
                folder = write_track(stems, engine.samplerate, stems_dir.parent, stems_dir.name, plan.format)
            del stems
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        files = {name: f"{name}.{plan.format.extension}" for name in names}
        sizes = {name: (folder / file).stat().st_size for name, file in files.items()}
        mode, note = plan.mode, plan.note
        if mode == "attach" and not fits(sizes.values(), spec.attachment_limit):
            # Estimates are conservative, but a lossless file can compress worse than expected.
            if not spec.links_available:
                raise too_large_error(plan.format, spec.attachment_limit)
            mode, note = "links", links_note(spec.attachment_limit, spec.link_valid_hours)
        preview = None
        if spec.preview:
            try:
                from .preview import render_preview

                # A long track's picture is drawn from peaks read blockwise.
                preview = render_preview({n: folder / f for n, f in files.items()}, folder / "preview.png",
                                         bounded=duration > config.blocks_above_s).name
            except Exception:  # noqa: BLE001 - a missing picture must not fail the job
                log.warning("preview for job %s failed", job, exc_info=True)
        return {
            "files": files, "sizes": sizes, "duration_s": duration, "separation_s": separation_s,
            "format": asdict(plan.format), "mode": mode, "note": note, "preview": preview,
        }
