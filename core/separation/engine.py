"""The separation engine: one Demucs model, loaded once and kept on its device.

It runs demucs's own `apply_model` (segments, overlap, shifts) and adds what a service
needs around it: progress as a fraction (inside a segment's forward pass too),
cancellation within a fraction of a segment, stem selection that runs only the
specialists a request needs, exact CPU speed-ups, and a count of the time spent in the
model's forward passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from core.errors import BadRequestError, DeviceUnavailableError, JobCancelled
from core.separation import catalogue
from core.separation.batching import (
    SegmentBatcher,
    TrackWork,
    autocast,
    bag_members,
    segment_and_stride,
    sub_models,
)
from core.separation.stems import StemRequest

if TYPE_CHECKING:
    from demucs.apply import Model
    from demucs.repo import AnyModel

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float], None]
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class SeparationOptions:
    """demucs's quality/speed knobs. `shifts=0` is deterministic."""

    shifts: int = 1
    overlap: float = 0.25
    segment: float | None = None
    # Mixed precision of the forward passes: "fp32", "fp16" (GPUs) or "bf16" (GPUs, and
    # CPUs with bf16 instructions); docs/performance.md has what it costs in SNR.
    precision: str = "fp32"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError("CUDA was asked for but no CUDA device is available")
    return torch.device(device)


@dataclass
class _Plan:
    model: AnyModel
    computes_all_sources: bool
    sources: frozenset[str] = field(default_factory=frozenset)


def tune_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Exact CPU speed-ups, measured on an htdemucs-sized model (bench/cpu_tuning.py):

    - PyTorch's multi-head-attention "fast path" (taken in inference mode) computes
      self-attention with plain batched matmuls; without it the same attention goes to
      the fused scaled-dot-product kernel: the forward pass takes 0.89x the time.
    - channels-last weights let oneDNN skip a layout conversion around every 2-D
      convolution of the spectrogram branch: 0.93x.

    Results change only by float rounding (well above 100 dB SNR). The fast-path switch
    is process-wide: the processes that separate (model host, CLI) do nothing else."""
    torch.backends.mha.set_fastpath_enabled(False)
    # Module.to accepts memory_format (see its docstring), but torch's overloads omit it.
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


class SeparationEngine:
    """Holds one loaded model on one device and separates mixes with it."""

    def __init__(self, model: AnyModel, name: str, device: torch.device):
        self.model = model.to(device)
        self.model.eval()
        if device.type == "cpu":
            tune_for_cpu(self.model)
        self.name = name
        self.device = device
        # What runs the networks: "torch", or a runtime of core.separation.onnx_backend.
        self.backend = "torch"
        self.forward_seconds = 0.0
        self._plans: dict[frozenset[str], _Plan] = {}
        self._clocks = [_ForwardClock(sub) for sub, _ in sub_models(self.model)]

    @classmethod
    def load(cls, name: str, model_dir: Path | None = None, device: str = "auto", backend: str = "torch",
             export_dir: Path | None = None, precision: str = "fp32") -> SeparationEngine:
        """`backend` (auto, torch, onnx, openvino) runs the model on a CPU; `export_dir`
        keeps the exports of the ONNX-based backends (default: see onnx_backend). The
        exports are fp32: a lower `precision` (autocast) runs on torch, which `auto` picks then."""
        if precision != "fp32":
            if backend not in ("auto", "torch"):
                raise BadRequestError(f"precision {precision} runs on the torch backend only, not {backend}")
            backend = "torch"
        # A model folder's `NAME.ckpt` + `NAME.yaml` is a community checkpoint (#16).
        from core.separation.checkpoint_engine import CheckpointEngine, is_checkpoint  # noqa: PLC0415 - it imports this module

        if is_checkpoint(name, model_dir):
            return CheckpointEngine.load(name, model_dir, device)
        torch_device = resolve_device(device)
        model = catalogue.load(name, model_dir)
        used = "torch"
        if torch_device.type == "cpu" and backend != "torch":
            from core.separation import onnx_backend  # noqa: PLC0415 - demucs loads only when a model runs

            folder = export_dir or onnx_backend.default_export_dir(model_dir)
            model, used = onnx_backend.prepare(model, backend, folder)
        engine = cls(model, name, torch_device)
        engine.backend = used
        log.info("model %s on %s, run by %s", name, torch_device, used)
        return engine

    @property
    def sources(self) -> list[str]:
        return list(self.model.sources)

    @property
    def samplerate(self) -> int:
        return int(self.model.samplerate)

    @property
    def audio_channels(self) -> int:
        return int(self.model.audio_channels)

    @property
    def max_segment(self) -> float:
        from demucs.apply import BagOfModels  # noqa: PLC0415 - demucs loads only when a model runs
        from demucs.htdemucs import HTDemucs  # noqa: PLC0415 - demucs loads only when a model runs

        if isinstance(self.model, BagOfModels):
            return float(self.model.max_allowed_segment)
        if isinstance(self.model, HTDemucs):
            return float(self.model.segment)
        return float("inf")

    def warm_up(self) -> None:
        """Run one short separation so the first real job does not pay for lazy set-up."""
        silence = np.zeros((self.audio_channels, self.samplerate), dtype=np.float32)
        self.separate(silence, StemRequest(tuple(self.sources)), SeparationOptions(shifts=0))

    def _plan(self, needed: frozenset[str]) -> _Plan:
        """The smallest part of a bag of per-stem specialists that estimates `needed`."""
        from demucs.apply import BagOfModels  # noqa: PLC0415 - demucs loads only when a model runs

        if needed in self._plans:
            return self._plans[needed]
        plan = _Plan(self.model, True, frozenset(self.sources))
        if isinstance(self.model, BagOfModels):
            index = [self.sources.index(s) for s in needed]
            keep = [i for i, w in enumerate(self.model.weights) if any(w[k] != 0 for k in index)]
            if len(keep) < len(self.model.models):
                members = bag_members(self.model)
                sub = BagOfModels([members[i] for i in keep], [self.model.weights[i] for i in keep])
                covered = frozenset(
                    s for k, s in enumerate(self.sources) if any(self.model.weights[i][k] != 0 for i in keep)
                )
                plan = _Plan(sub, False, covered)
        self._plans[needed] = plan
        return plan

    def separate(
        self,
        mix: np.ndarray,
        request: StemRequest,
        options: SeparationOptions = SeparationOptions(),
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        stats: tuple[float, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Separate `mix` (float32, channels x samples, at `samplerate`) into the stems of
        `request`, as float32 arrays of the same shape. Raises JobCancelled as soon as
        `should_cancel()` turns true (checked around every model segment).

        `stats` (mean, spread) normalise the mix instead of its own (see `_mono_stats`):
        a part of a track separated with the whole track's stats gives what the whole
        track would there (core.separation.blockwise)."""
        from demucs.apply import apply_model  # noqa: PLC0415 - demucs loads only when a model runs

        if options.segment is not None and options.segment > self.max_segment:
            raise BadRequestError(
                f"segment {options.segment:g} s is longer than this model allows ({self.max_segment:g} s)"
            )
        if mix.ndim != 2 or mix.shape[0] != self.audio_channels:
            raise ValueError(f"mix must be ({self.audio_channels}, samples), got {mix.shape}")
        plan = self._plan(request.direct_sources)
        wav = torch.from_numpy(np.ascontiguousarray(mix, dtype=np.float32))
        length = wav.shape[-1]

        mean, std = _normalisation(wav, stats)
        strides = [_stride(sub, options) for sub, _ in sub_models(plan.model)]
        tracker = _ProgressTracker(length, strides, progress, should_cancel)
        started = time.monotonic()
        # A runtime that computes several segments at once (onnx_backend's streams) gets
        # them from apply_model's own pool: its segments are submitted to it in order,
        # and its results summed in order, so the output is the same as one at a time.
        streams = min(getattr(sub, "streams", 1) for sub, _ in sub_models(plan.model))
        pool = ThreadPoolExecutor(streams, thread_name_prefix="segment") if streams > 1 else None
        with torch.inference_mode(), autocast(self.device, options.precision), _listening(self._clocks, tracker), \
                _shut_down_after(pool):
            out = apply_model(
                plan.model,
                ((wav - mean) / std)[None],
                shifts=options.shifts,
                split=True,
                overlap=options.overlap,
                segment=options.segment,
                device=self.device,
                pool=pool,
                callback=tracker,
                callback_arg={"audio_length": length, "shifts": options.shifts},
            )
            out = (out.float() * std + mean)[0]
        self.forward_seconds += tracker.forward_seconds
        log.debug("separated %.1f s of audio in %.2f s", length / self.samplerate, time.monotonic() - started)
        if progress is not None:
            progress(1.0)
        return self._outputs(out, wav, plan, request)

    def _outputs(self, out: torch.Tensor, wav: torch.Tensor, plan: _Plan, request: StemRequest
                 ) -> dict[str, np.ndarray]:
        """The requested stems from the model's estimates (sources x channels x samples)."""
        estimates = {name: out[k] for k, name in enumerate(self.sources) if name in plan.sources}
        results: dict[str, np.ndarray] = {}
        for name in request.outputs:
            if not name.startswith("no_"):
                results[name] = estimates[name].numpy()
            elif plan.computes_all_sources:
                # As `demucs --two-stems`: the sum of the other stems.
                others = [estimates[s] for s in self.sources if s != name[3:]]
                results[name] = torch.stack(others).sum(0).numpy()
            else:
                # Only the specialist ran: the rest is the mix minus its estimate.
                results[name] = (wav - estimates[name[3:]]).numpy()
        return results

    def start_track(self, mix: np.ndarray, request: StemRequest,
                    options: SeparationOptions = SeparationOptions(),
                    stats: tuple[float, float] | None = None) -> TrackSeparation:
        """`mix` as segments that a `core.separation.batching.SegmentBatcher` may compute together
        with other tracks' (of this engine or another on the same device). `stats`: as
        for `separate`."""
        plan = self._plan(request.direct_sources)
        wav = torch.from_numpy(np.ascontiguousarray(mix, dtype=np.float32))
        mean, std = _normalisation(wav, stats)
        work = TrackWork(plan.model, (wav - mean) / std, shifts=options.shifts, overlap=options.overlap,
                         segment=options.segment)
        return TrackSeparation(self, work, wav, (mean, std), plan, request)

    def separate_many(
        self,
        mixes: list[np.ndarray],
        request: StemRequest,
        options: SeparationOptions = SeparationOptions(),
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Separate several mixes together, their segments sharing forward passes. With
        `shifts=0` each result equals `separate` of that mix alone, up to float rounding."""
        tracks = [self.start_track(mix, request, options) for mix in mixes]
        works = [track.work for track in tracks]
        batcher = SegmentBatcher(self.device, batch_size, options.precision)
        total = max(1, sum(work.total for work in works))
        started = time.monotonic()
        while not all(work.finished for work in works):
            batcher.step(works)
            if should_cancel is not None and should_cancel():
                raise JobCancelled()
            if progress is not None:
                progress(min(sum(work.done for work in works) / total, 0.999))
        self.forward_seconds += time.monotonic() - started
        results = [track.stems() for track in tracks]
        if progress is not None:
            progress(1.0)
        return results


@dataclass
class TrackSeparation:
    """One mix on its way through shared forward passes; `stems()` once its work is done."""

    engine: SeparationEngine
    work: TrackWork
    wav: torch.Tensor
    stats: tuple[torch.Tensor, torch.Tensor]
    plan: _Plan
    request: StemRequest

    def stems(self) -> dict[str, np.ndarray]:
        mean, std = self.stats
        return self.engine._outputs(self.work.result() * std + mean, self.wav, self.plan, self.request)


def _mono_stats(wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and spread demucs's Separator normalises a mix by; the same here, so that
    results match `python -m demucs`."""
    ref = wav.mean(0)
    return ref.mean(), ref.std() + 1e-8


def _normalisation(wav: torch.Tensor, stats: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mix's own stats, or the given ones (a block of a longer track)."""
    if stats is None:
        return _mono_stats(wav)
    mean, std = stats
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _stride(model: Model, options: SeparationOptions) -> int:
    """apply_model's step between segments, in samples (0: a model that is not split)."""
    if options.segment is None and getattr(model, "segment", None) is None:
        return 0
    return segment_and_stride(model, options.segment, options.overlap)[1]


class _ForwardClock:
    """Tells how far one forward pass of a model has come.

    Forward hooks on the model's blocks (modules up to three levels down) fire in the
    same order on every pass. Each pass is timed: each block's end as a share of the
    whole pass. The next pass reports those shares to a listener as its blocks end, so
    a job on a CPU shows progress (and can be cancelled) within a second, not only
    after a whole segment (about 2 s for htdemucs on two cores, more with fewer)."""

    def __init__(self, model: torch.nn.Module):
        self.shares: list[float] | None = None
        self.listener: Callable[[float], None] | None = None
        self._ends: list[float] = []
        self._started = 0.0
        self._calls = 0
        model.register_forward_pre_hook(self._begin)
        model.register_forward_hook(self._finish)
        for name, module in model.named_modules():
            if name and name.count(".") < 3 and not isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                module.register_forward_hook(self._block_done)

    def _begin(self, *_: object) -> None:
        self._calls = 0
        self._ends = []
        self._started = time.perf_counter()

    def _block_done(self, *_: object) -> None:
        index = self._calls
        self._calls += 1
        self._ends.append(time.perf_counter())
        if self.listener is not None and self.shares is not None and index < len(self.shares):
            self.listener(self.shares[index])

    def _finish(self, *_: object) -> None:
        # Re-learnt every pass: the very first one also pays for lazy set-up.
        if self._ends:
            whole = max(time.perf_counter() - self._started, 1e-9)
            self.shares = [(end - self._started) / whole for end in self._ends]


class _shut_down_after:
    """Ends a segment pool with the separation (its queued segments dropped on a cancel)."""

    def __init__(self, pool: ThreadPoolExecutor | None):
        self.pool = pool

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _listening:
    """Routes the clocks' in-pass shares to a tracker for one separation."""

    def __init__(self, clocks: list[_ForwardClock], tracker: _ProgressTracker):
        self.clocks, self.tracker = clocks, tracker

    def __enter__(self) -> None:
        for clock in self.clocks:
            clock.listener = self.tracker.inside

    def __exit__(self, *_: object) -> None:
        for clock in self.clocks:
            clock.listener = None


class _ProgressTracker:
    """demucs's apply_model callback: turns segment events into a 0..1 fraction, checks
    for cancellation, and times the forward passes (between 'start' and 'end').

    A segment covers the fraction from its offset to the next one's (`strides`, per model
    of a bag); `inside` moves through that span while its forward pass runs."""

    def __init__(self, length: int, strides: list[int], progress: ProgressCallback | None,
                 should_cancel: CancelCheck | None):
        self.length = max(1, length)
        self.strides = strides
        self.progress = progress
        self.should_cancel = should_cancel
        self.forward_seconds = 0.0
        self._fraction = 0.0
        self._span = (0.0, 0.0)
        # Passes in flight (several at once with a runtime's streams) and since when at
        # least one has been: forward_seconds counts the time any pass runs, once.
        self._in_flight = 0
        self._busy_since = 0.0
        self._done: dict[tuple[int, int], int] = {}

    def _at(self, info: dict[str, Any], within: float) -> float:
        models_count = max(1, int(info.get("models", 1)))
        shifts = max(1, int(info.get("shifts", 1)))
        return (info.get("model_idx_in_bag", 0) + (info.get("shift_idx", 0) + min(1.0, within)) / shifts) / models_count

    def _report(self, fraction: float) -> None:
        if self.progress is not None and fraction > self._fraction:
            self._fraction = fraction
            self.progress(min(fraction, 0.999))

    def inside(self, share: float) -> None:
        start, end = self._span
        self._report(start + (end - start) * share)
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled()

    def __call__(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        offset = info.get("segment_offset", 0)
        index = int(info.get("model_idx_in_bag", 0))
        stride = self.strides[index] if index < len(self.strides) else 0
        if info.get("state") == "start":
            if self._in_flight == 0:
                self._busy_since = now
            self._in_flight += 1
            self._span = (self._at(info, offset / self.length), self._at(info, (offset + stride) / self.length))
        elif info.get("state") == "end":
            if self._in_flight > 0:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self.forward_seconds += now - self._busy_since
            # Segments may end out of order (several at once): the share of the track done
            # is what the ended segments of this model and shift cover.
            part = (index, int(info.get("shift_idx", 0)))
            self._done[part] = self._done.get(part, 0) + stride
            self._report(self._at(info, self._done[part] / self.length))
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled()
