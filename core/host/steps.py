"""The steps of a job in the model host, whichever host runs them: load the engine,
prepare (probe and decode), separate, finish (find the tempo and key, encode, plan the
upload, draw the preview), and report each stage, the progress, a cancellation or a failure as host events."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Container
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, cast

import numpy as np
import torch

from core.errors import BadRequestError, DeviceOutOfMemoryError, JobCancelled, StembotError
from core.host.protocol import (
    CancelledEvent,
    EventSink,
    FailedEvent,
    HostConfig,
    HostEvent,
    JobResult,
    JobSpec,
    ProgressEvent,
    ReadyEvent,
    StageEvent,
)
from core.media import analysis
from core.media.audio import Limits, OutputFormat, decode, probe
from core.media.preview import render_preview
from core.media.render import MIX, RenderOptions, mix_files, mix_stems
from core.media.stem_files import write_track
from core.media.upload_plan import fits, links_note, plan_upload, too_large_error
from core.separation import blockwise
from core.separation.batching import out_of_memory
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import parse_stems

if TYPE_CHECKING:
    from typing import TypeAlias

    from core.media.audio import OutputFormatName
    from core.separation.blockwise import StagedMix
    from core.separation.stems import StemRequest

    # A separated job's stems: in memory (name -> channels x samples), or a long track's on disk.
    Stems: TypeAlias = dict[str, np.ndarray] | blockwise.StagedStems

log = logging.getLogger(__name__)

Progress = Callable[[float], None]
StepArgs = TypeVarTuple("StepArgs")
T = TypeVar("T")
# What a chain's first model gives its cleaning model (`/split clean:` cleans an acapella).
CHAIN_INPUT = "vocals"


@dataclass
class PreparedJob:
    """A decoded job, ready to separate."""

    spec: JobSpec
    engine: SeparationEngine
    request: StemRequest
    duration_s: float
    mix: np.ndarray | None = None  # channels x samples, or None when `staged` (a long track on disk)
    staged: StagedMix | None = None
    work: Path | None = None  # scratch folder of a long track
    # A chain (`/split clean:`): the model run on the vocals of `engine`, and its request.
    cleaner: SeparationEngine | None = None
    clean_request: StemRequest | None = None

    @property
    def first_share(self) -> float:
        """The part of the job's progress its first model's pass makes: half of a chain."""
        return 0.5 if self.cleaner is not None else 1.0

    def cleanup(self) -> None:
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None


class _AnalysisThread:
    """Runs the tempo/key analyses one after another on a daemon thread: a host that exits
    does not wait for one (a ThreadPoolExecutor's threads are joined at exit)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="analysis", daemon=True)
                self._thread.start()
        self._queue.put((future, function, args))
        return future

    def _run(self) -> None:
        while True:
            future, function, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)


class JobSteps:
    """What every host does for a job; the hosts decide when, and how many at once."""

    def __init__(self, config: HostConfig, events: EventSink, cancelled: Container[int], parent: int):
        self.config = config
        self.parent = parent
        self.events = events
        self.cancelled = cancelled
        self.engines: dict[str, SeparationEngine] = {}
        self._engines_lock = threading.Lock()
        # The tempo/key analyses, one at a time (jobs of a batching host finish on several
        # threads) and after the warm-up, each beside its job's encoding.
        self._analyses = _AnalysisThread()

    def boot(self) -> int:
        """Load and warm up the host's model, report ready; returns the jobs it takes at once."""
        started = time.monotonic()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        engine = self.engine(self.config.model)
        loaded = time.monotonic()
        if self.config.warm_up:
            engine.warm_up()
            # numba compiles librosa's functions on first use: 5-30 s. Paid once here, beside
            # the first job rather than in it, without holding up the host's start.
            self._analyses.submit(self._warm_up_analysis)
        if self.config.batch_jobs is not None:
            capacity = self.config.batch_jobs
        else:
            capacity = 4 if engine.device.type == "cuda" else 1
        self.send(ReadyEvent(model=self.config.model, device=str(engine.device), pid=os.getpid(),
                             load_s=loaded - started, warmup_s=time.monotonic() - loaded, capacity=capacity,
                             backend=engine.backend))
        return capacity

    def engine(self, name: str) -> SeparationEngine:
        """The engine of model `name`, loaded once; the least recently used goes first."""
        with self._engines_lock:  # decoding threads ask for engines too
            if name in self.engines:
                self.engines[name] = self.engines.pop(name)  # most recently used last
                return self.engines[name]
            while len(self.engines) >= self.config.max_loaded_models:
                self.engines.pop(next(iter(self.engines)))
            model_dir = Path(self.config.model_dir) if self.config.model_dir else None
            export_dir = Path(self.config.export_dir) if self.config.export_dir else None
            engine = SeparationEngine.load(name, model_dir, self.config.device, self.config.backend, export_dir,
                                           self.config.precision)
            self.engines[name] = engine
            return engine

    def options(self) -> SeparationOptions:
        config = self.config
        return SeparationOptions(config.shifts, config.overlap, config.segment, config.precision)

    def _warm_up_analysis(self) -> None:
        try:
            log.info("tempo/key analysis warmed up in %.1f s", analysis.warm_up())
        except Exception:
            log.warning("tempo/key analysis warm-up failed", exc_info=True)

    def start_analysis(self, job_id: int, stems: Stems, sample_rate: int) -> Future[analysis.TrackAnalysis] | None:
        """Start finding the track's tempo and key from (a window of) its stems, on the
        analysis thread; the window is copied now, so the stems may go meanwhile."""
        try:
            window = _analysis_window(stems, sample_rate)
        except Exception:
            log.warning("tempo/key analysis for job %s failed", job_id, exc_info=True)
            return None
        return self._analyses.submit(analysis.analyse_stems, window, sample_rate)

    def analysis_of(self, job_id: int,
                    running: Future[analysis.TrackAnalysis] | None) -> analysis.TrackAnalysis | None:
        """The analysis started for a job; None if it failed: the analysis is extra, never a
        reason to fail a job."""
        if running is None:
            return None
        started = time.monotonic()
        try:
            found = running.result()
        except Exception:
            log.warning("tempo/key analysis for job %s failed", job_id, exc_info=True)
            return None
        log.info("job %s: %s (waited %.1f s for it)", job_id, found.describe() or "no tempo or key found",
                 time.monotonic() - started)
        return found

    # -- reporting ----------------------------------------------------------------------------

    def send(self, event: HostEvent) -> None:
        self.events.put(event)

    def is_cancelled(self, job_id: int) -> bool:
        """Whether `job_id` is to stop; exits the process when the bot is gone."""
        if os.getppid() != self.parent:
            os._exit(0)  # the bot is gone: nobody will read the result
        return job_id in self.cancelled

    def stage(self, job_id: int, stage: str, duration_s: float | None = None) -> None:
        """Report that a job enters `stage`, or raise JobCancelled if it is to stop."""
        if self.is_cancelled(job_id):
            raise JobCancelled()
        self.send(StageEvent(job_id, stage, duration_s))

    def progress_reporter(self, job_id: int, start: float = 0.0, share: float = 1.0) -> Progress:
        """Reports a pass's fraction as `start + share * fraction` of the job's."""
        last_sent = 0.0

        def progress(fraction: float) -> None:
            nonlocal last_sent
            now = time.monotonic()
            # The queue is cheap, but the bot only shows an update every ~2 s anyway.
            if now - last_sent >= 0.5 or fraction >= 1.0:
                last_sent = now
                self.send(ProgressEvent(job_id, start + share * fraction))
        return progress

    def first_pass_progress(self, prepared: PreparedJob) -> Progress:
        return self.progress_reporter(prepared.spec.job_id, 0.0, prepared.first_share)

    def guarded(self, job_id: int, step: Callable[[*StepArgs], object], *args: *StepArgs) -> None:
        """Run a step of a job; its cancellation or failure ends the job, reported as such,
        and the host lives on."""
        try:
            step(*args)
        except JobCancelled:
            self.send(CancelledEvent(job_id))
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the host lives on
            self.fail(job_id, exc)

    def fail(self, job_id: int, exc: Exception) -> None:
        if not hasattr(exc, "reason"):
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        self.send(FailedEvent.of(job_id, _user_facing(exc)))

    def free_device_memory(self) -> None:
        """Hand the blocks PyTorch caches back to the GPU (after running out of memory)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- the job's steps ----------------------------------------------------------------------

    def prepare(self, spec: JobSpec) -> PreparedJob:
        """Probe and decode (a long track: to a scratch folder, in blocks)."""
        job = spec.job_id
        config = self.config
        limits = Limits(config.min_duration_s, config.max_duration_s, config.max_input_bytes)
        self.stage(job, "decoding")
        engine = self.engine(spec.model)
        cleaner = clean_request = None
        if spec.clean_model is not None:
            # A chain: the first model gives the vocals, the cleaning model `spec.stems` of them.
            cleaner = self.engine(spec.clean_model)
            clean_request = parse_stems(spec.stems, cleaner.sources)
            if (cleaner.samplerate, cleaner.audio_channels) != (engine.samplerate, engine.audio_channels):
                raise BadRequestError(f"{spec.clean_model} cannot clean what {spec.model} separates "
                                      "(another sample rate or channel count)")
        request = parse_stems(CHAIN_INPUT if cleaner is not None else spec.stems, engine.sources)
        input_path = Path(spec.input_path)
        stems_dir = Path(spec.stems_dir)
        info = probe(input_path, limits)
        prepared = PreparedJob(spec, engine, request, 0.0, cleaner=cleaner, clean_request=clean_request)
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
        if prepared.staged is not None:
            frames = prepared.staged.frames
        else:
            assert prepared.mix is not None
            frames = prepared.mix.shape[1]
        prepared.duration_s = frames / engine.samplerate
        return prepared

    def separate_alone(self, prepared: PreparedJob) -> tuple[Stems, list[str]]:
        """Separate one job on its own; returns its stems and their names."""
        job = prepared.spec.job_id
        engine = prepared.engine
        progress = self.first_pass_progress(prepared)
        if prepared.staged is not None:
            assert prepared.work is not None and self.config.block_s is not None  # staged: blocks are on
            staged_stems = blockwise.separate_staged(prepared.staged, engine, prepared.request, self.options(),
                                                     prepared.work, progress=progress,
                                                     should_cancel=lambda: self.is_cancelled(job),
                                                     block_s=self.config.block_s)
            prepared.staged.path.unlink()
            return staged_stems, staged_stems.names
        assert prepared.mix is not None
        stems = engine.separate(prepared.mix, prepared.request, self.options(), progress=progress,
                                should_cancel=lambda: self.is_cancelled(job))
        prepared.mix = None
        return stems, list(stems)

    def clean_pass(self, prepared: PreparedJob, stems: Stems, names: list[str]) -> tuple[Stems, list[str]]:
        """A chain's second pass: its cleaning model on the vocals of the first; the stems
        are then the cleaning model's. Without a chain, the stems as they are."""
        cleaner, request = prepared.cleaner, prepared.clean_request
        if cleaner is None:
            return stems, names
        assert request is not None  # set with the cleaner
        job = prepared.spec.job_id
        progress = self.progress_reporter(job, prepared.first_share, 1.0 - prepared.first_share)

        def cancelled() -> bool:
            return self.is_cancelled(job)

        if isinstance(stems, blockwise.StagedStems):
            assert prepared.work is not None and prepared.staged is not None and self.config.block_s is not None
            vocals = blockwise.staged_stem(stems, CHAIN_INPUT, prepared.staged.info)
            # Its own folder: a cleaning model's stem may share a name with the first's.
            work = prepared.work / "clean"
            work.mkdir(exist_ok=True)
            cleaned = blockwise.separate_staged(vocals, cleaner, request, self.options(), work, progress=progress,
                                                should_cancel=cancelled, block_s=self.config.block_s)
            for path in stems.paths.values():
                path.unlink(missing_ok=True)
            return cleaned, cleaned.names
        cleaned_stems = cleaner.separate(stems[CHAIN_INPUT], request, self.options(), progress=progress,
                                         should_cancel=cancelled)
        return cleaned_stems, list(cleaned_stems)

    def finish(self, prepared: PreparedJob, stems: Stems, names: list[str],
               separation_s: float) -> JobResult:
        """Encode the stems, choose attachments or links, draw the preview."""
        spec, config = prepared.spec, self.config
        job, duration = spec.job_id, prepared.duration_s
        stems_dir = Path(spec.stems_dir)
        render = RenderOptions.from_column(spec.render)
        # From the separated stems, before any mix: the key is read from all but the drums.
        analysing = self.start_analysis(job, stems, prepared.engine.samplerate)
        if render.mix is not None:
            stems, names = self.mixed(prepared, stems, render.mix), [MIX]
        # The files are as long as the track at the chosen tempo.
        rendered_s = render.rendered_length(duration)
        # The job's format was checked against OutputFormatName when the job was made.
        requested = OutputFormat(name=cast("OutputFormatName", spec.format), mp3_bitrate_kbps=spec.mp3_bitrate_kbps)
        plan = plan_upload(requested, rendered_s, len(names), spec.attachment_limit, spec.links_available,
                           link_valid_hours=spec.link_valid_hours)
        shutil.rmtree(stems_dir, ignore_errors=True)  # a retry starts clean
        filters = render.audio_filters()
        if isinstance(stems, blockwise.StagedStems):
            folder = blockwise.write_staged(stems, stems_dir.parent, stems_dir.name, plan.format, filters)
        else:
            folder = write_track(stems, prepared.engine.samplerate, stems_dir.parent, stems_dir.name, plan.format,
                                 filters)
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
                # A long track's picture is drawn from peaks read blockwise.
                preview = render_preview({n: folder / f for n, f in files.items()}, folder / "preview.png",
                                         bounded=rendered_s > config.blocks_above_s).name
            except Exception:
                log.warning("preview for job %s failed", job, exc_info=True)
        found = self.analysis_of(job, analysing)
        return JobResult(files=files, sizes=sizes, duration_s=duration, separation_s=separation_s,
                         format=asdict(plan.format), mode=mode, note=note, preview=preview,
                         analysis=found.artifact() if found is not None else None)


    @staticmethod
    def mixed(prepared: PreparedJob, stems: Stems, mix: tuple[tuple[str, int], ...]) -> Stems:
        """The one stem `mix` of the chosen stems at their volumes, in memory or (a long
        track) on disk beside the staged stems, which it replaces."""
        if isinstance(stems, blockwise.StagedStems):
            assert prepared.work is not None  # staged stems live in the work folder
            target = prepared.work / f"{MIX}.f32"
            peak = mix_files(stems.paths, mix, target, stems.channels, stems.sample_rate)
            for path in stems.paths.values():
                path.unlink(missing_ok=True)
            return blockwise.StagedStems({MIX: target}, stems.frames, stems.channels, stems.sample_rate, peak)
        return {MIX: mix_stems(stems, mix)}


def _analysis_window(stems: Stems, sample_rate: int) -> dict[str, np.ndarray]:
    """What the analysis reads of each stem: at most `analysis.WINDOW_S` from the middle,
    in mono (a copy); a long track's from its files on disk."""
    if isinstance(stems, blockwise.StagedStems):
        frames = analysis.window(stems.frames, sample_rate)
        # Interleaved float32, frames x channels: only the window is read from disk.
        return {name: np.memmap(path, dtype=np.float32, mode="r",
                                shape=(stems.frames, stems.channels))[frames].mean(axis=1, dtype=np.float32)
                for name, path in stems.paths.items()}
    mono = {}
    for name, audio in stems.items():
        windowed = audio[..., analysis.window(audio.shape[-1], sample_rate)]
        mono[name] = (windowed.mean(axis=0, dtype=np.float32) if windowed.ndim == 2
                      else np.array(windowed, dtype=np.float32))
    return mono


def _user_facing(exc: Exception) -> Exception:
    """Running out of memory is a limit of this worker, not a bug: say so in words."""
    if not isinstance(exc, StembotError) and out_of_memory(exc):
        return DeviceOutOfMemoryError("the worker ran out of memory separating this track; try again later")
    return exc
