"""Separating several tracks at once: their segments share forward passes.

demucs's `apply_model` runs one track's segments one after another, which leaves a
large GPU mostly idle. Here each track becomes a `TrackWork`: exactly the segments
`apply_model` would cut (same length, stride, centred padding, random shifts and
triangular cross-fade, for every model of a bag), each put back where `apply_model` would
put it. A `SegmentBatcher` stacks pending segments of any number of tracks into one
forward pass. Tracks may join and leave between passes, which is how the model host
batches the segments of concurrent jobs. Without random shifts (`shifts=0`) the stems
equal those of `apply_model` track by track, up to float rounding.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from demucs.apply import BagOfModels, Model, TensorChunk
    from demucs.repo import AnyModel


def _triangle(length: int, device: torch.device) -> torch.Tensor:
    # apply_model's weight with transition_power=1.
    weight = torch.cat([torch.arange(1, length // 2 + 1, device=device),
                        torch.arange(length - length // 2, 0, -1, device=device)])
    return weight / weight.max()


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """Mixed precision for the forward passes: "fp32" (none), "fp16" or "bf16"."""
    if precision == "fp32":
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def bag_members(bag: BagOfModels) -> list[Model]:
    """The models of a bag (its `models` is an nn.ModuleList, typed as plain modules)."""
    from demucs.demucs import Demucs  # noqa: PLC0415 - demucs loads only when a model runs
    from demucs.hdemucs import HDemucs  # noqa: PLC0415 - demucs loads only when a model runs
    from demucs.htdemucs import HTDemucs  # noqa: PLC0415 - demucs loads only when a model runs

    members: list[Model] = []
    for member in bag.models:
        # BagOfModels is built from demucs models only (its constructor takes list[Model]).
        assert isinstance(member, (Demucs, HDemucs, HTDemucs)), f"unexpected model in a bag: {type(member)}"
        members.append(member)
    return members


def sub_models(model: AnyModel) -> list[tuple[Model, list[float] | None]]:
    """The models of a bag with their per-source weights; a lone model, unweighted."""
    from demucs.apply import BagOfModels  # noqa: PLC0415 - demucs loads only when a model runs

    if isinstance(model, BagOfModels):
        return list(zip(bag_members(model), model.weights, strict=True))
    return [(model, None)]


def segment_and_stride(model: Model, segment: float | None, overlap: float) -> tuple[int, int]:
    """apply_model's segment length and step between segments, in samples."""
    length = int(model.samplerate * float(segment if segment is not None else model.segment))
    return length, int((1 - overlap) * length)


class _Pass:
    """One model over one (possibly shifted) copy of the mix: apply_model's split loop."""

    def __init__(self, model: Model, chunk: TensorChunk, segment: float | None, overlap: float, trim: int,
                 weights: list[float] | None):
        from demucs.apply import TensorChunk  # noqa: PLC0415 - demucs loads only when a model runs
        from demucs.htdemucs import HTDemucs  # noqa: PLC0415 - demucs loads only when a model runs

        self.model, self.chunk, self.trim, self.weights = model, chunk, trim, weights
        self.segment_length, stride = segment_and_stride(model, segment, overlap)
        self.pieces: list[Piece] = []
        # Demucs and HTDemucs pad a segment to their valid length; HDemucs has none.
        valid_length = getattr(model, "valid_length", None)
        for offset in range(0, chunk.length, stride):
            piece = TensorChunk(chunk, offset, self.segment_length)
            if isinstance(model, HTDemucs) and segment is not None:
                valid = int(segment * model.samplerate)
            elif callable(valid_length):
                valid = valid_length(piece.length)
            else:
                valid = piece.length
            self.pieces.append(Piece(self, offset, piece, valid))
        self.remaining = len(self.pieces)
        self.out: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None

    def accept(self, piece: Piece, result: torch.Tensor, weight: torch.Tensor) -> None:
        from demucs.utils import center_trim  # noqa: PLC0415 - demucs loads only when a model runs

        total, sums = self.out, self.sums
        if total is None or sums is None:
            where = self.chunk.tensor.device
            total = self.out = torch.zeros(len(self.model.sources), self.chunk.shape[1], self.chunk.length,
                                           device=where)
            sums = self.sums = torch.zeros(self.chunk.length, device=where)
        out = center_trim(result, piece.chunk.length)
        n = out.shape[-1]
        end = piece.offset + self.segment_length
        total[..., piece.offset:end] += (weight[:n] * out).to(total.device)
        sums[piece.offset:end] += weight[:n].to(sums.device)
        self.remaining -= 1

    def result(self) -> torch.Tensor:
        assert self.out is not None and self.sums is not None, "result() is called after every piece was accepted"
        out = self.out / self.sums
        self.out = self.sums = None
        return out[..., self.trim:]


@dataclass(eq=False)
class Piece:
    """One segment: what it is cut from, where, and the length it is padded to."""

    owner: _Pass
    offset: int
    chunk: TensorChunk
    valid: int

    @property
    def key(self) -> tuple[int, int]:
        # Only segments for the same model, padded alike, can share a forward pass.
        return id(self.owner.model), self.valid


class TrackWork:
    """One track (channels x samples, normalised as the caller likes) through `model` (a
    model or a bag): its segments, computed in any order and batch, and its stems
    (sources x channels x samples) once all are done."""

    def __init__(self, model: AnyModel, mix: torch.Tensor, *, shifts: int = 0, overlap: float = 0.25,
                 segment: float | None = None):
        from demucs.apply import TensorChunk  # noqa: PLC0415 - demucs loads only when a model runs

        length = mix.shape[-1]
        self.shifts = shifts
        self.passes: list[_Pass] = []
        for sub, weights in sub_models(model):
            if not shifts:
                self.passes.append(_Pass(sub, TensorChunk(mix[None]), segment, overlap, 0, weights))
                continue
            max_shift = int(0.5 * sub.samplerate)
            padded = TensorChunk(mix[None]).padded(length + 2 * max_shift)
            for _ in range(shifts):
                offset = random.randint(0, max_shift)
                shifted = TensorChunk(padded, offset, length + max_shift - offset)
                self.passes.append(_Pass(sub, shifted, segment, overlap, max_shift - offset, weights))
        self._queue = [piece for p in self.passes for piece in p.pieces]
        self.total = len(self._queue)
        self._next = 0

    @property
    def done(self) -> int:
        return self.total - sum(p.remaining for p in self.passes)

    @property
    def finished(self) -> bool:
        return self.done == self.total

    def peek(self) -> Piece | None:
        return self._queue[self._next] if self._next < len(self._queue) else None

    def take(self) -> Piece:
        piece = self._queue[self._next]
        self._next += 1
        return piece

    def give_back(self, count: int) -> None:
        """Return the last `count` segments taken (their forward pass failed)."""
        self._next -= count

    def result(self) -> torch.Tensor:
        """The stems; call once, when `finished`."""
        estimate: torch.Tensor | None = None
        totals: list[float] | None = None
        shifts = max(1, self.shifts)
        for index in range(0, len(self.passes), shifts):
            group = self.passes[index:index + shifts]
            summed = group[0].result()
            for p in group[1:]:
                summed = summed + p.result()
            average = summed / shifts
            weights = group[0].weights
            if weights is None:
                return average
            scale = torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1).to(average.device)
            estimate = average * scale if estimate is None else estimate + average * scale
            totals = list(weights) if totals is None else [a + b for a, b in zip(totals, weights, strict=True)]
        assert estimate is not None and totals is not None, "a track has at least one pass"
        divisor = torch.tensor(totals, dtype=torch.float32).view(-1, 1, 1).to(estimate.device)
        return estimate / divisor


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the device (or the host) running out of memory."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


class PassFailed(Exception):
    """A forward pass failed. Its segments went back to their tracks, to be run again."""

    def __init__(self, cause: Exception, works: list[TrackWork], segments: int):
        super().__init__(f"forward pass over {segments} segment(s) of {len(works)} track(s) failed: {cause!r}")
        self.cause = cause
        self.works = works
        self.segments = segments


class SegmentBatcher:
    """Runs forward passes over the pending segments of several tracks, up to
    `batch_size` segments a pass, taking from the tracks in turn."""

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 8, precision: str = "fp32"):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.precision = precision
        self._weights: dict[int, torch.Tensor] = {}

    def _next_batch(self, works: list[TrackWork]) -> list[tuple[TrackWork, Piece]]:
        heads = [w for w in works if w.peek() is not None]
        first = heads[0].peek() if heads else None
        if first is None:
            return []
        key = first.key
        batch: list[tuple[TrackWork, Piece]] = []
        while len(batch) < self.batch_size:
            added = False
            for work in heads:
                head = work.peek()
                if head is not None and head.key == key and len(batch) < self.batch_size:
                    batch.append((work, work.take()))
                    added = True
            if not added:
                break
        return batch

    def step(self, works: list[TrackWork]) -> list[TrackWork]:
        """One forward pass; returns the tracks it advanced (each once, in order). Raises
        `PassFailed` with the segments given back when the pass fails."""
        batch = self._next_batch(works)
        if not batch:
            return []
        model = batch[0][1].owner.model
        valid = batch[0][1].valid
        try:
            inputs = torch.cat([piece.chunk.padded(valid) for _, piece in batch]).to(self.device)
            with torch.inference_mode(), autocast(self.device, self.precision):
                results = model(inputs)
            results = results.float()
        except Exception as exc:
            works = list(dict.fromkeys(work for work, _ in batch))
            for work in works:
                work.give_back(sum(1 for taken, _ in batch if taken is work))
            raise PassFailed(exc, works, len(batch)) from exc
        length = batch[0][1].owner.segment_length
        weight = self._weights.get(length)
        if weight is None:
            weight = self._weights[length] = _triangle(length, self.device)
        advanced: list[TrackWork] = []
        for row, (work, piece) in enumerate(batch):
            piece.owner.accept(piece, results[row], weight)
            if work not in advanced:
                advanced.append(work)
        return advanced
