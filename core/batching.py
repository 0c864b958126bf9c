"""Separating several tracks at once: their segments share forward passes.

demucs's `apply_model` runs one track's segments one after another, which leaves a
large GPU mostly idle. This module cuts every track into exactly the segments
`apply_model` would (same length, stride, centred padding and triangular cross-fade),
stacks segments of all tracks into batches, and puts each result back where
`apply_model` would have. Without random shifts (`shifts=0`) the stems equal those of
`apply_model` track by track, up to float rounding; with shifts, each track gets its own
random offsets as in `apply_model`.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Callable

import torch

Progress = Callable[[int, int], None]  # segments done, segments in all


def _triangle(length: int, device) -> torch.Tensor:
    # apply_model's weight with transition_power=1.
    weight = torch.cat([torch.arange(1, length // 2 + 1, device=device),
                        torch.arange(length - length // 2, 0, -1, device=device)])
    return weight / weight.max()


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward passes: "fp32" (none), "fp16" or "bf16"."""
    if precision == "fp32":
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _split_batched(model, mixes: list, *, overlap: float, segment: float | None,
                   device: torch.device, batch_size: int, precision: str, tick: Callable[[], None]
                   ) -> list[torch.Tensor]:
    """One model on many mixes (TensorChunks of 1 x channels x samples); returns
    sources x channels x samples for each."""
    from demucs.apply import TensorChunk
    from demucs.htdemucs import HTDemucs
    from demucs.utils import center_trim

    seg = float(segment if segment is not None else model.segment)
    segment_length = int(model.samplerate * seg)
    stride = int((1 - overlap) * segment_length)
    weight = _triangle(segment_length, device)
    sources = len(model.sources)
    outs = [torch.zeros(sources, m.shape[1], m.length, device=m.device) for m in mixes]
    sums = [torch.zeros(m.length, device=m.device) for m in mixes]

    # (track, offset, chunk, padded length), in apply_model's order per track. Chunks
    # of chunks read the padding from the data around them, as in apply_model.
    pieces = []
    for index, mix in enumerate(mixes):
        for offset in range(0, mix.length, stride):
            chunk = TensorChunk(mix, offset, segment_length)
            if isinstance(model, HTDemucs) and segment is not None:
                valid = int(segment * model.samplerate)
            elif hasattr(model, "valid_length"):
                valid = model.valid_length(chunk.length)
            else:
                valid = chunk.length
            pieces.append((index, offset, chunk, valid))
    # Only segments padded to the same length can share a batch (HTDemucs: all of them).
    by_length: dict[int, list] = {}
    for piece in pieces:
        by_length.setdefault(piece[3], []).append(piece)
    for valid, group in by_length.items():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            inputs = torch.cat([chunk.padded(valid) for _, _, chunk, _ in batch]).to(device)
            with torch.no_grad(), autocast(device, precision):
                result = model(inputs)
            result = result.float()
            for row, (index, offset, chunk, _) in enumerate(batch):
                out = center_trim(result[row], chunk.length)
                n = out.shape[-1]
                outs[index][..., offset:offset + segment_length] += (weight[:n] * out).to(outs[index].device)
                sums[index][offset:offset + segment_length] += weight[:n].to(sums[index].device)
                tick()
    for out, total in zip(outs, sums):
        out /= total
    return outs


def _with_shifts(model, mixes, *, shifts: int, tick, **kwargs) -> list[torch.Tensor]:
    from demucs.apply import TensorChunk

    if not shifts:
        return _split_batched(model, [TensorChunk(m[None]) for m in mixes], tick=tick, **kwargs)
    max_shift = int(0.5 * model.samplerate)
    totals = [0.0] * len(mixes)
    for _ in range(shifts):
        shifted, offsets = [], []
        for mix in mixes:
            length = mix.shape[-1]
            padded = TensorChunk(mix[None]).padded(length + 2 * max_shift)
            offset = random.randint(0, max_shift)
            shifted.append(TensorChunk(padded, offset, length + max_shift - offset))
            offsets.append(offset)
        results = _split_batched(model, shifted, tick=tick, **kwargs)
        for index, (result, offset) in enumerate(zip(results, offsets)):
            totals[index] = totals[index] + result[..., max_shift - offset:]
    return [total / shifts for total in totals]


def count_segments(model, lengths: list[int], overlap: float, segment: float | None, shifts: int) -> int:
    """How many segment forward passes `separate_batch` will report through `progress`."""
    from demucs.apply import BagOfModels

    models = model.models if isinstance(model, BagOfModels) else [model]
    total = 0
    for sub in models:
        seg = float(segment if segment is not None else sub.segment)
        stride = int((1 - overlap) * int(sub.samplerate * seg))
        extra = int(0.5 * sub.samplerate) if shifts else 0
        per = sum(-(-(n + extra) // stride) for n in lengths)  # an upper bound with shifts
        total += per * max(1, shifts)
    return total


def separate_batch(model, mixes: list[torch.Tensor], *, shifts: int = 0, overlap: float = 0.25,
                   segment: float | None = None, device: torch.device | str = "cpu", batch_size: int = 8,
                   precision: str = "fp32", tick: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
    """`apply_model` for many mixes at once (each channels x samples, normalised as the
    caller likes); a bag of models is weighted per source as in `apply_model`."""
    from demucs.apply import BagOfModels

    device = torch.device(device)
    kwargs = dict(shifts=shifts, overlap=overlap, segment=segment, device=device, batch_size=batch_size,
                  precision=precision, tick=tick)
    if not isinstance(model, BagOfModels):
        return _with_shifts(model, mixes, **kwargs)
    estimates = [0.0] * len(mixes)
    totals = [0.0] * len(model.sources)
    for sub, weights in zip(model.models, model.weights):
        results = _with_shifts(sub, mixes, **kwargs)
        scale = torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1)
        for index, result in enumerate(results):
            estimates[index] = estimates[index] + result * scale.to(result.device)
        for k, w in enumerate(weights):
            totals[k] += w
    divisor = torch.tensor(totals, dtype=torch.float32).view(-1, 1, 1)
    return [estimate / divisor.to(estimate.device) for estimate in estimates]
