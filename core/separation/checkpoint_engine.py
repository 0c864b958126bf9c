"""The separation engine for community checkpoints (BS-RoFormer, Mel-Band RoFormer, MDX23C).

The networks are python-audio-separator's own classes, loaded from the model folder's
`NAME.yaml` + `NAME.ckpt` without its `Separator` (which fetches a catalogue from GitHub
first). The chunked inference around them is stembot's, so that progress, cancellation and
batching work per chunk, and it computes what audio-separator's `MDXCSeparator.demix` does
(tests/core/separation/test_checkpoint_parity.py holds them to 40 dB SNR and more):

- RoFormers: chunks of `stft_hop_length * (inference.dim_t - 1)` samples every
  `chunk / inference.num_overlap`, the last one ending at the track's end; each weighted by
  a Hamming window, summed, divided by the summed windows;
- MDX23C: chunks of `audio.hop_length * (inference.dim_t - 1)` every `chunk / num_overlap`
  over the mix padded with `chunk - step` zeros on both sides; summed, divided by
  `num_overlap`.

A model with a `target_instrument` estimates that one source; the other is the mix minus
it, so the stems sum back to the mix. The engine has SeparationEngine's public surface
(`sources`, `samplerate`, `separate`, `start_track`, ...), so the hosts, blockwise long
tracks and the CLI use it unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.errors import JobCancelled, ModelUnavailableError
from core.separation import checkpoint_models
from core.separation.batching import autocast
from core.separation.checkpoint_models import CheckpointModel
from core.separation.engine import (
    CancelCheck,
    ProgressCallback,
    SeparationEngine,
    SeparationOptions,
    _ForwardClock,
    resolve_device,
)
from core.separation.stems import StemRequest

if TYPE_CHECKING:
    from core.separation.engine import TrackSeparation

log = logging.getLogger(__name__)


def build_network(model: CheckpointModel) -> torch.nn.Module:
    """The checkpoint's network with its weights, on the CPU, in eval mode."""
    try:
        from audio_separator.separator.roformer.roformer_loader import (  # noqa: PLC0415 - the optional extra
            RoformerLoader,
        )
        from audio_separator.separator.uvr_lib_v5.tfc_tdf_v3 import (  # noqa: PLC0415 - the optional extra
            TFC_TDF_net,
        )
        from ml_collections import ConfigDict  # noqa: PLC0415 - the optional extra
    except ImportError as exc:
        raise ModelUnavailableError(
            f"model '{model.name}' is a {model.family} checkpoint, which needs python-audio-separator: "
            f"{checkpoint_models.MODELS_EXTRA_HINT} ({exc})") from exc
    if model.family in ("bs_roformer", "mel_band_roformer"):
        result = RoformerLoader().load_model(model_path=str(model.weights), config=model.config, device="cpu")
        if not result.success or result.model is None:
            raise ModelUnavailableError(f"model '{model.name}' could not be loaded: {result.error_message}")
        network: torch.nn.Module = result.model
    else:
        network = TFC_TDF_net(ConfigDict(model.config), device="cpu")
        state = torch.load(model.weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        network.load_state_dict(state)
    return network.eval()


@dataclass(frozen=True)
class ChunkPlan:
    """Where a mix of `length` samples is cut, and how the pieces are put back."""

    chunk: int  # samples a chunk spans
    step: int  # samples between chunk starts
    pad: int  # zeros before the mix (MDX23C)
    starts: tuple[int, ...]  # chunk starts in the padded mix
    padded_length: int
    windowed: bool  # RoFormer: Hamming-weighted, divided by the summed weights
    overlap: int  # MDX23C: the sum is divided by this


def plan_chunks(model: CheckpointModel, length: int) -> ChunkPlan:
    """audio-separator's chunk schedule for `model` over `length` samples."""
    inference = model.config.get("inference") or {}
    dim_t = int(inference.get("dim_t", 256))
    overlap = int(inference.get("num_overlap") or 8)
    if model.family == "mdx23c":
        chunk = int(model.config["audio"]["hop_length"]) * (dim_t - 1)
        step = chunk // overlap
        pad_end = step - (length - chunk) % step
        pad = chunk - step
        padded = length + pad + pad_end + chunk - step
        starts = tuple(range(0, padded - chunk + 1, step))
        return ChunkPlan(chunk, step, pad, starts, padded, False, overlap)
    hop = (model.config.get("model") or {}).get("stft_hop_length") or model.config["audio"]["hop_length"]
    chunk = int(hop) * (dim_t - 1)
    step = chunk // overlap
    starts_list: list[int] = []
    for offset in range(0, length, step):
        if offset + chunk >= length:
            tail = max(length - chunk, 0)
            if not starts_list or starts_list[-1] != tail:
                starts_list.append(tail)
            break
        starts_list.append(offset)
    return ChunkPlan(chunk, step, 0, tuple(starts_list), length, True, overlap)


def _window(length: int) -> torch.Tensor:
    """scipy's symmetric Hamming window, as audio-separator weights RoFormer chunks."""
    if length == 1:
        return torch.ones(1)
    return torch.from_numpy(np.hamming(length).astype(np.float32))


@dataclass(eq=False)
class ChunkWork:
    """One mix through a checkpoint network, chunk by chunk: the chunks may be computed in
    any order and batch (`take`/`accept`), the estimates come out once all are in."""

    model: CheckpointModel
    mix: torch.Tensor  # channels x samples
    plan: ChunkPlan
    next_index: int = 0
    accepted: int = 0
    result: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    padded: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        plan = self.plan
        if plan.pad or plan.padded_length != self.mix.shape[-1]:
            after = plan.padded_length - plan.pad - self.mix.shape[-1]
            self.padded = torch.nn.functional.pad(self.mix, (plan.pad, after))
        else:
            self.padded = self.mix

    @property
    def total(self) -> int:
        return len(self.plan.starts)

    @property
    def done(self) -> int:
        return self.accepted

    @property
    def finished(self) -> bool:
        return self.accepted == self.total

    def pending(self) -> int:
        return self.total - self.next_index

    def chunk_length(self, index: int) -> int:
        start = self.plan.starts[index]
        return min(self.plan.chunk, self.plan.padded_length - start)

    def take(self) -> tuple[int, torch.Tensor]:
        index = self.next_index
        self.next_index += 1
        start = self.plan.starts[index]
        return index, self.padded[:, start:start + self.plan.chunk]

    def give_back(self, count: int) -> None:
        self.next_index -= count

    def accept(self, index: int, out: torch.Tensor) -> None:
        """The network's output for chunk `index`: (estimated sources x) channels x samples."""
        out = out.float().cpu()
        if out.dim() == 2:
            out = out[None]
        plan = self.plan
        start = plan.starts[index]
        if self.result is None:
            self.result = torch.zeros(out.shape[0], self.mix.shape[0], plan.padded_length)
            self.weights = torch.zeros(plan.padded_length) if plan.windowed else None
        length = min(self.chunk_length(index), out.shape[-1])
        if plan.windowed:
            assert self.weights is not None, "made with the result"
            window = _window(plan.chunk)[:length]
            self.result[..., start:start + length] += out[..., :length] * window
            self.weights[start:start + length] += window
        else:
            self.result[..., start:start + length] += out[..., :length]
        self.accepted += 1

    def estimates(self) -> torch.Tensor:
        """(estimated sources) x channels x samples, once `finished`."""
        assert self.result is not None, "estimates() is called after every chunk was accepted"
        plan = self.plan
        if plan.windowed:
            assert self.weights is not None, "made with the result"
            return self.result / self.weights.clamp(min=1e-10)
        length = self.mix.shape[-1]
        return (self.result / plan.overlap)[..., plan.pad:plan.pad + length]


class CheckpointEngine(SeparationEngine):
    """One checkpoint network on one device, with SeparationEngine's surface."""

    # Its chunks do not go through core.separation.batching's SegmentBatcher (demucs's
    # segments): a batching model host runs its jobs one at a time (`separate_many` batches
    # the chunks of several mixes of one call).
    shares_passes = False

    def __init__(self, checkpoint: CheckpointModel, network: torch.nn.Module, device: torch.device):
        # Not SeparationEngine.__init__: that one is demucs's (bags, channels-last tuning).
        self.checkpoint = checkpoint
        self.network = network.to(device).eval()
        self.name = checkpoint.name
        self.device = device
        self.forward_seconds = 0.0
        self.backend = "torch"  # the ONNX-based backends export demucs's networks only
        self._plans = {}
        self._clocks = [_ForwardClock(self.network)]

    @classmethod
    def load(cls, name: str, model_dir: Path | None = None, device: str = "auto", backend: str = "torch",
             export_dir: Path | None = None, precision: str = "fp32") -> CheckpointEngine:
        """`backend` and `export_dir` are the Demucs engine's: a checkpoint runs on torch."""
        torch_device = resolve_device(device)
        if model_dir is None:
            raise ModelUnavailableError(f"model '{name}' is a checkpoint and no model folder is set")
        checkpoint = checkpoint_models.describe(name, Path(model_dir))
        started = time.monotonic()
        try:
            network = build_network(checkpoint)
        except ModelUnavailableError:
            raise
        except Exception as exc:  # a broken or incompatible file: say which model
            log.exception("loading checkpoint %s failed", name)
            raise ModelUnavailableError(
                f"model '{name}' could not be loaded from {checkpoint.weights}: {exc.__class__.__name__}: {exc}"
            ) from exc
        log.info("loaded %s checkpoint %s in %.2f s", checkpoint.family, name, time.monotonic() - started)
        return cls(checkpoint, network, torch_device)

    @property
    def sources(self) -> list[str]:
        return list(self.checkpoint.sources)

    @property
    def samplerate(self) -> int:
        return self.checkpoint.samplerate

    @property
    def audio_channels(self) -> int:
        return self.checkpoint.audio_channels

    @property
    def max_segment(self) -> float:
        return float("inf")  # stembot's `--segment` is demucs's; chunks come from the YAML

    def block_grid(self, options: SeparationOptions) -> tuple[int, int]:
        """(stride, context) in frames for blockwise long tracks: block starts on the chunk
        grid, and a whole chunk of context on each side."""
        plan = plan_chunks(self.checkpoint, 0)
        return plan.step, plan.chunk

    def start_work(self, mix: np.ndarray) -> ChunkWork:
        if mix.ndim != 2 or mix.shape[0] != self.audio_channels:
            raise ValueError(f"mix must be ({self.audio_channels}, samples), got {mix.shape}")
        wav = torch.from_numpy(np.ascontiguousarray(mix, dtype=np.float32))
        return ChunkWork(self.checkpoint, wav, plan_chunks(self.checkpoint, wav.shape[-1]))

    def forward(self, chunks: torch.Tensor, precision: str) -> torch.Tensor:
        """The network over a batch of chunks (batch x channels x samples)."""
        with torch.inference_mode(), autocast(self.device, precision):
            out = self.network(chunks.to(self.device))
        return out.float()

    def separate(
        self,
        mix: np.ndarray,
        request: StemRequest,
        options: SeparationOptions = SeparationOptions(),
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        stats: tuple[float, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """As SeparationEngine.separate; `stats` is not used (these networks take the mix as
        it is), and cancellation is checked around every chunk and inside its forward pass."""
        work = self.start_work(mix)
        tracker = _ChunkProgress(work.total, progress, should_cancel)
        for clock in self._clocks:
            clock.listener = tracker.inside
        started = time.monotonic()
        try:
            while work.pending():
                tracker.check()
                tracker.begin(work.next_index)
                index, chunk = work.take()
                work.accept(index, self.forward(chunk[None], options.precision)[0])
                tracker.end(work.done)
        finally:
            for clock in self._clocks:
                clock.listener = None
            self.forward_seconds += time.monotonic() - started
        if progress is not None:
            progress(1.0)
        return self.outputs(work, request)

    def outputs(self, work: ChunkWork, request: StemRequest) -> dict[str, np.ndarray]:
        """The requested stems from a finished work's estimates; a target model's other source
        and every `no_x` are the mix minus what the network estimated."""
        estimates = work.estimates()
        named = {name: estimates[k] for k, name in enumerate(self.checkpoint.estimated)}
        mix = work.mix
        for name in self.checkpoint.sources:
            if name not in named:  # the residual of a target model
                named[name] = mix - named[self.checkpoint.estimated[0]]
        results: dict[str, np.ndarray] = {}
        for name in request.outputs:
            if name.startswith("no_"):
                results[name] = (mix - named[name[3:]]).numpy()
            else:
                results[name] = named[name].numpy()
        return results

    def start_track(self, mix: np.ndarray, request: StemRequest,
                    options: SeparationOptions = SeparationOptions(),
                    stats: tuple[float, float] | None = None) -> TrackSeparation:
        raise NotImplementedError("checkpoint models run one job at a time (separate, separate_many)")

    def separate_many(
        self,
        mixes: list[np.ndarray],
        request: StemRequest,
        options: SeparationOptions = SeparationOptions(),
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Several mixes, their full-length chunks sharing forward passes (`batch_size` a
        pass); each result equals `separate` of that mix alone, up to float rounding."""
        works = [self.start_work(mix) for mix in mixes]
        total = max(1, sum(work.total for work in works))
        started = time.monotonic()
        try:
            while any(work.pending() for work in works):
                if should_cancel is not None and should_cancel():
                    raise JobCancelled()
                batch = _next_batch(works, batch_size)
                chunks = torch.stack([chunk for _, _, chunk in batch])
                out = self.forward(chunks, options.precision)
                for row, (work, index, _) in enumerate(batch):
                    work.accept(index, out[row])
                if progress is not None:
                    progress(min(sum(work.done for work in works) / total, 0.999))
        finally:
            self.forward_seconds += time.monotonic() - started
        results = [self.outputs(work, request) for work in works]
        if progress is not None:
            progress(1.0)
        return results


def _next_batch(works: list[ChunkWork], batch_size: int) -> list[tuple[ChunkWork, int, torch.Tensor]]:
    """Up to `batch_size` pending chunks of one length, from the works in turn."""
    batch: list[tuple[ChunkWork, int, torch.Tensor]] = []
    length: int | None = None
    while len(batch) < batch_size:
        added = False
        for work in works:
            if not work.pending() or len(batch) >= batch_size:
                continue
            size = work.chunk_length(work.next_index)
            if length is None:
                length = size
            if size != length:
                continue
            index, chunk = work.take()
            batch.append((work, index, chunk))
            added = True
        if not added:
            break
    return batch


class _ChunkProgress:
    """Chunks done as a 0..1 fraction, moving inside a chunk's forward pass too; raises
    JobCancelled when asked to stop (between chunks and inside a pass)."""

    def __init__(self, total: int, progress: ProgressCallback | None, should_cancel: CancelCheck | None):
        self.total = max(1, total)
        self.progress = progress
        self.should_cancel = should_cancel
        self._span = (0.0, 0.0)
        self._reported = 0.0

    def _report(self, fraction: float) -> None:
        if self.progress is not None and fraction > self._reported:
            self._reported = fraction
            self.progress(min(fraction, 0.999))

    def check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled()

    def begin(self, index: int) -> None:
        self._span = (index / self.total, (index + 1) / self.total)

    def inside(self, share: float) -> None:
        start, end = self._span
        self._report(start + (end - start) * share)
        self.check()

    def end(self, done: int) -> None:
        self._report(done / self.total)


def is_checkpoint(name: str, model_dir: Path | None) -> bool:
    """Whether `name` is a checkpoint model of `model_dir`."""
    return name in checkpoint_models.checkpoint_names(model_dir)
