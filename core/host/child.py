"""The model host: a spawned child process that owns the Demucs model.

It loads the model once, warms it up, then runs jobs: decode -> separate -> encode,
reporting each stage and the progress on an event queue. On a CPU it runs one job at a
time (`_Host`). On a GPU it runs several (`_BatchingHost`): they decode and encode in
threads while the main thread stacks the segments of all jobs being separated into
shared forward passes. It is started with the `spawn` method (never `fork` a process that
may touch CUDA) and exits by itself when its parent dies, so a killed bot leaves no
orphan holding the GPU.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.host.protocol import CancelBoard, HostConfig, JobSpec

log = logging.getLogger(__name__)


def host_main(config: HostConfig, requests, events, cancelled: CancelBoard) -> None:
    """Entry point of the child process."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s model-host: %(message)s")
    parent = os.getppid()
    _die_with_parent(parent)
    if config.nice:
        os.nice(config.nice)
    host = _Host(config, events, cancelled, parent)
    try:
        host.boot()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        events.put({"type": "fatal", "reason": _reason(exc), "kind": getattr(exc, "kind", "error")})
        return
    if host.capacity > 1:
        _BatchingHost(host).serve(requests)
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


def _user_facing(exc: Exception) -> Exception:
    """Running out of memory is a limit of this worker, not a bug: say so in words."""
    from core.errors import DeviceOutOfMemoryError, StembotError
    from core.separation.batching import out_of_memory

    if not isinstance(exc, StembotError) and out_of_memory(exc):
        return DeviceOutOfMemoryError("the worker ran out of memory separating this track; try again later")
    return exc


def _reason(exc: BaseException) -> str:
    from core.errors import StembotError

    if isinstance(exc, StembotError):
        return exc.reason
    return f"internal error ({exc.__class__.__name__})"


@dataclass
class _Prepared:
    """A decoded job, ready to separate."""

    spec: JobSpec
    engine: Any
    request: Any
    duration_s: float
    mix: Any = None  # channels x samples, or None when `staged` (a long track on disk)
    staged: Any = None
    work: Path | None = None  # scratch folder of a long track

    def cleanup(self) -> None:
        import shutil

        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None


class _Host:
    """One job at a time; also the job steps `_BatchingHost` runs concurrently."""

    def __init__(self, config: HostConfig, events, cancelled, parent: int):
        self.config = config
        self.parent = parent
        self.events = events
        self.cancelled = cancelled  # supports `job_id in cancelled`
        self.engines: dict[str, Any] = {}
        self.capacity = 1
        self._engines_lock = threading.Lock()

    def boot(self) -> None:
        started = time.monotonic()
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        engine = self.engine(self.config.model)
        loaded = time.monotonic()
        if self.config.warm_up:
            engine.warm_up()
        if self.config.batch_jobs is not None:
            self.capacity = self.config.batch_jobs
        else:
            self.capacity = 4 if engine.device.type == "cuda" else 1
        self.events.put({
            "type": "ready", "model": self.config.model, "device": str(engine.device), "pid": os.getpid(),
            "load_s": loaded - started, "warmup_s": time.monotonic() - loaded, "capacity": self.capacity,
        })

    def engine(self, name: str):
        from core.separation.engine import SeparationEngine

        with self._engines_lock:  # decoding threads ask for engines too
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
        def separate() -> None:
            result = self._separate(spec)
            self.events.put({"type": "done", "job": spec.job_id, **result})

        self.guarded(spec.job_id, separate)

    def guarded(self, job_id: int, step, *args) -> None:
        """Run a step of a job; its cancellation or failure ends the job, reported as such,
        and the host lives on."""
        from core.errors import JobCancelled

        try:
            step(*args)
        except JobCancelled:
            self.events.put({"type": "cancelled", "job": job_id})
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the host lives on
            self.fail(job_id, exc)

    def fail(self, job_id: int, exc: Exception) -> None:
        if not hasattr(exc, "reason"):
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        exc = _user_facing(exc)
        self.events.put({"type": "failed", "job": job_id, "reason": _reason(exc),
                         "kind": getattr(exc, "kind", "error")})

    def free_device_memory(self) -> None:
        """Hand the blocks PyTorch caches back to the GPU (after running out of memory)."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _cancelled(self, job_id: int) -> bool:
        if os.getppid() != self.parent:
            os._exit(0)  # the bot is gone: nobody will read the result
        return job_id in self.cancelled

    def _stage(self, job_id: int, stage: str, **extra) -> None:
        from core.errors import JobCancelled

        if self._cancelled(job_id):
            raise JobCancelled()
        self.events.put({"type": "stage", "job": job_id, "stage": stage, **extra})

    def _separate(self, spec: JobSpec) -> dict:
        prepared = self._prepare(spec)
        try:
            self._stage(spec.job_id, "separating", duration_s=prepared.duration_s)
            started = time.monotonic()
            stems, names = self._separate_prepared(prepared)
            separation_s = time.monotonic() - started
            self._stage(spec.job_id, "encoding")
            return self._finish(prepared, stems, names, separation_s)
        finally:
            prepared.cleanup()

    def _prepare(self, spec: JobSpec) -> _Prepared:
        """Probe and decode (a long track: to a scratch folder, in blocks)."""
        import shutil

        from core.media.audio import Limits, decode, probe
        from core.separation import blockwise
        from core.separation.stems import parse_stems

        job = spec.job_id
        config = self.config
        limits = Limits(config.min_duration_s, config.max_duration_s, config.max_input_bytes)
        self._stage(job, "decoding")
        engine = self.engine(spec.model)
        request = parse_stems(spec.stems, engine.sources)
        input_path = Path(spec.input_path)
        stems_dir = Path(spec.stems_dir)
        info = probe(input_path, limits)
        prepared = _Prepared(spec, engine, request, 0.0)
        try:
            if blockwise.use_blocks(info.duration_s, config.block_s, config.blocks_above_s):
                # Long, or of unknown length: decoded to disk, and kept there if long.
                prepared.work = blockwise.work_dir(stems_dir.parent, stems_dir.name)
                staged = blockwise.stage_input(input_path, engine, limits, prepared.work, info)
                if staged.duration_s <= config.blocks_above_s:
                    prepared.mix = staged.load()
                    shutil.rmtree(prepared.work, ignore_errors=True)
                    prepared.work = None
                else:
                    prepared.staged = staged
            else:
                prepared.mix = decode(input_path, engine.samplerate, engine.audio_channels, limits, info)
        except BaseException:
            prepared.cleanup()
            raise
        frames = prepared.staged.frames if prepared.staged else prepared.mix.shape[1]
        prepared.duration_s = frames / engine.samplerate
        return prepared

    def _progress_reporter(self, job: int):
        last_sent = [0.0]

        def progress(fraction: float) -> None:
            now = time.monotonic()
            # The queue is cheap, but the bot only shows an update every ~2 s anyway.
            if now - last_sent[0] >= 0.5 or fraction >= 1.0:
                last_sent[0] = now
                self.events.put({"type": "progress", "job": job, "fraction": fraction})
        return progress

    def _options(self):
        from core.separation.engine import SeparationOptions

        config = self.config
        return SeparationOptions(config.shifts, config.overlap, config.segment, config.precision)

    def _separate_prepared(self, prepared: _Prepared):
        """Separate one job on its own; returns its stems and their names."""
        from core.separation import blockwise

        job = prepared.spec.job_id
        engine = prepared.engine
        progress = self._progress_reporter(job)
        if prepared.staged is not None:
            stems = blockwise.separate_staged(prepared.staged, engine, prepared.request, self._options(),
                                              prepared.work, progress=progress,
                                              should_cancel=lambda: self._cancelled(job),
                                              block_s=self.config.block_s)
            prepared.staged.path.unlink()
            return stems, stems.names
        stems = engine.separate(prepared.mix, prepared.request, self._options(), progress=progress,
                                should_cancel=lambda: self._cancelled(job))
        prepared.mix = None
        return stems, list(stems)

    def _finish(self, prepared: _Prepared, stems, names: list[str], separation_s: float) -> dict:
        """Encode the stems, choose attachments or links, draw the preview."""
        import shutil

        from core.media.audio import OutputFormat
        from core.media.stem_files import write_track
        from core.media.upload_plan import fits, links_note, plan_upload, too_large_error
        from core.separation import blockwise

        spec, config = prepared.spec, self.config
        job, duration = spec.job_id, prepared.duration_s
        stems_dir = Path(spec.stems_dir)
        requested = OutputFormat(name=spec.format, mp3_bitrate_kbps=spec.mp3_bitrate_kbps)
        plan = plan_upload(requested, duration, len(names), spec.attachment_limit, spec.links_available,
                             link_valid_hours=spec.link_valid_hours)
        shutil.rmtree(stems_dir, ignore_errors=True)  # a retry starts clean
        if prepared.staged is not None:
            folder = blockwise.write_staged(stems, stems_dir.parent, stems_dir.name, plan.format)
        else:
            folder = write_track(stems, prepared.engine.samplerate, stems_dir.parent, stems_dir.name, plan.format)
        del stems
        prepared.cleanup()
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
                from core.media.preview import render_preview

                # A long track's picture is drawn from peaks read blockwise.
                preview = render_preview({n: folder / f for n, f in files.items()}, folder / "preview.png",
                                         bounded=duration > config.blocks_above_s).name
            except Exception:
                log.warning("preview for job %s failed", job, exc_info=True)
        return {
            "files": files, "sizes": sizes, "duration_s": duration, "separation_s": separation_s,
            "format": asdict(plan.format), "mode": mode, "note": note, "preview": preview,
        }


@dataclass(eq=False)
class _Separating:
    """A job in a batching host's shared passes: its track is the whole mix, or for a long
    track the block being separated (`blocks` stitches them together on disk)."""

    prepared: _Prepared
    track: Any  # core.separation.engine.TrackSeparation
    progress: Any  # fraction -> None
    started: float
    blocks: Any = None  # core.separation.blockwise.BlockStitcher

    @property
    def job(self) -> int:
        return self.prepared.spec.job_id

    @property
    def fraction(self) -> float:
        work = self.track.work
        within = work.done / max(1, work.total)
        return self.blocks.fraction(within) if self.blocks is not None else min(within, 0.999)


class _BatchingHost:
    """Several jobs at once on one device (a GPU): each is decoded and later encoded in a
    thread, while this process's main thread runs forward passes over the segments of
    all jobs being separated (core.separation.batching). A job joins the batches as soon as it is
    decoded and leaves them when its last segment is done or it is cancelled, so a short
    track never waits for a long one, and encoding overlaps the next separation.

    A long track (core.separation.blockwise) joins one block at a time: the next block starts when
    the last one's segments are done and its stems are on disk, so memory stays bounded
    by a block while its segments share passes with the other jobs'."""

    def __init__(self, host: _Host):
        from concurrent.futures import ThreadPoolExecutor

        from core.separation.batching import SegmentBatcher

        self.host = host
        self.events = host.events
        self.capacity = host.capacity
        self.ready: queue.Queue = queue.Queue()  # decoded jobs for the main thread
        self.decoders = ThreadPoolExecutor(self.capacity, thread_name_prefix="decode")
        self.encoders = ThreadPoolExecutor(self.capacity, thread_name_prefix="encode")
        self.batcher = SegmentBatcher(host.engine(host.config.model).device, host.config.batch_segments,
                                      host.config.precision)
        self.active: list[_Separating] = []
        self.shared: dict[int, int] = {}  # job id -> most jobs in one forward pass with it
        self.stopping = False

    def serve(self, requests) -> None:
        intake = threading.Thread(target=self._intake, args=(requests,), name="intake", daemon=True)
        intake.start()
        while not (self.stopping and not self.active and self.ready.empty()):
            if os.getppid() != self.host.parent:
                os._exit(0)  # the bot is gone: nobody will read the results
            self._admit(block=not self.active)
            self._drop_cancelled()
            if self.active:
                self._step()
        self.decoders.shutdown(wait=True)
        self.encoders.shutdown(wait=True)

    def _intake(self, requests) -> None:
        """Thread: new jobs go to the decoders; None means stop after the running ones."""
        while True:
            try:
                message = requests.get(timeout=1.0)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                message = None
            if message is None:
                self.stopping = True
                self.ready.put(None)
                return
            spec = JobSpec(**message)
            self.decoders.submit(self.host.guarded, spec.job_id, self._decode, spec)

    def _decode(self, spec: JobSpec) -> None:
        prepared = self.host._prepare(spec)
        try:
            self.host._stage(spec.job_id, "separating", duration_s=prepared.duration_s)
        except BaseException:
            prepared.cleanup()
            raise
        self.ready.put(prepared)

    def _admit(self, block: bool) -> None:
        """Take in the jobs decoded since the last pass (wait for one when idle)."""
        from core.separation.blockwise import BlockStitcher

        while True:
            try:
                prepared = self.ready.get(timeout=1.0) if block else self.ready.get_nowait()
            except queue.Empty:
                return
            block = False
            if prepared is None:
                continue

            def join(prepared: _Prepared = prepared) -> None:
                blocks = None
                if prepared.staged is not None:
                    blocks = BlockStitcher(prepared.staged, prepared.engine, prepared.request,
                                           self.host._options(), prepared.work, self.host.config.block_s)
                entry = _Separating(prepared, None, self.host._progress_reporter(prepared.spec.job_id),
                                    time.monotonic(), blocks)
                try:
                    self._next_track(entry)
                except BaseException:
                    self._leave(entry)
                    raise
                self.active.append(entry)
            self.host.guarded(prepared.spec.job_id, join)

    def _next_track(self, entry: _Separating) -> None:
        """Start the whole mix, or the next block of a long track."""
        prepared = entry.prepared
        options = self.host._options()
        if entry.blocks is None:
            entry.track = prepared.engine.start_track(prepared.mix, prepared.request, options)
            prepared.mix = None
        else:
            entry.track = prepared.engine.start_track(entry.blocks.audio(), prepared.request, options,
                                                      stats=entry.blocks.stats)

    def _drop_cancelled(self) -> None:
        for entry in list(self.active):
            if self.host._cancelled(entry.job):
                self._leave(entry)
                self.events.put({"type": "cancelled", "job": entry.job})

    def _leave(self, entry: _Separating) -> None:
        """A job leaves before its end (cancelled or failed)."""
        if entry in self.active:
            self.active.remove(entry)
        if entry.blocks is not None:
            entry.blocks.close()
        entry.prepared.cleanup()
        self.shared.pop(entry.job, None)

    def _step(self) -> None:
        from core.separation.batching import PassFailed

        works = [entry.track.work for entry in self.active]
        try:
            advanced = self.batcher.step(works)
        except PassFailed as failure:
            self._recover(failure)
            return
        except Exception as exc:  # noqa: BLE001 - past the forward pass, a bug: these jobs fail, the host lives on
            for entry in list(self.active):
                self._leave(entry)
                self.host.fail(entry.job, exc)
            return
        for entry in list(self.active):
            work = entry.track.work
            if work in advanced:
                self.shared[entry.job] = max(self.shared.get(entry.job, 1), len(advanced))
            if not work.finished:
                entry.progress(entry.fraction)
                continue
            self.active.remove(entry)
            # Back in the passes once its next block is read, or off to the encoders.
            self.host.guarded(entry.job, self._track_done, entry)

    def _track_done(self, entry: _Separating) -> None:
        stems = entry.track.stems()
        entry.track = None
        try:
            if entry.blocks is not None:
                entry.blocks.add(stems)
                if not entry.blocks.finished:
                    self._next_track(entry)
                    self.active.append(entry)
                    return
                stems = entry.blocks.result()
                entry.prepared.staged.path.unlink()
        except BaseException:
            self._leave(entry)
            raise
        entry.progress(1.0)
        names = stems.names if entry.blocks is not None else list(stems)
        self.encoders.submit(self.host.guarded, entry.job, self._encode, entry.prepared, stems, names,
                             time.monotonic() - entry.started)

    def _recover(self, failure) -> None:
        """A forward pass failed and its segments were given back: only the jobs to blame
        fail, the others go on."""
        from core.separation.batching import PassFailed, out_of_memory

        if out_of_memory(failure.cause) and failure.segments > 1:
            # Too many segments at once for this device: fewer a pass from now on.
            self.batcher.batch_size = max(1, failure.segments // 2)
            log.warning("a forward pass over %d segments ran out of memory; %d segments a pass from now on",
                        failure.segments, self.batcher.batch_size)
            self.host.free_device_memory()
            return
        if out_of_memory(failure.cause) or len(failure.works) == 1:
            for work in failure.works:
                self._fail_work(work, failure.cause)
            return
        # Something else: run each track's next segments alone to find the one(s) to blame.
        for work in failure.works:
            try:
                self.batcher.step([work])
            except PassFailed as alone:
                self._fail_work(work, alone.cause)

    def _fail_work(self, work, exc: Exception) -> None:
        for entry in self.active:
            if entry.track.work is work:
                self._leave(entry)
                self.host.fail(entry.job, exc)
                return

    def _encode(self, prepared: _Prepared, stems, names: list[str], separation_s: float) -> None:
        job = prepared.spec.job_id
        try:
            self.host._stage(job, "encoding")
            result = self.host._finish(prepared, stems, names, separation_s)
        finally:
            prepared.cleanup()
        self.events.put({"type": "done", "job": job, **result, "batched_jobs": self.shared.pop(job, 1)})
