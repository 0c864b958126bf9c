"""Tiny HTDemucs models that fail the way real ones can on a GPU, for the model host's
recovery tests. They are saved and loaded like any model (demucs pickles the class by
name), so a spawned model host runs them through demucs's own loading code."""

from __future__ import annotations

import time

import torch
from demucs.htdemucs import HTDemucs


class OutOfMemoryAbove2(HTDemucs):
    """Runs out of memory, as CUDA reports it, on a forward pass over more than 2 segments."""

    limit = 2

    def forward(self, mix):
        if mix.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {mix.shape[0]} segments")
        return super().forward(mix)


class AlwaysOutOfMemory(OutOfMemoryAbove2):
    """Too big for the device even one segment at a time."""

    limit = 0


class BreaksOnTrueStereo(HTDemucs):
    """A bug that is not memory: fails on any pass that holds a segment whose channels differ."""

    def forward(self, mix):
        if any(not torch.equal(row[0], row[-1]) for row in mix):
            raise RuntimeError("this model cannot take true stereo")
        return super().forward(mix)


class SlowOnSound(HTDemucs):
    """A slow device: each forward pass over sound (not the warm-up's silence) takes 1.5 s
    more, so that a test can act while a job is separating."""

    def forward(self, mix):
        if bool(mix.abs().max() > 0):
            time.sleep(1.5)
        return super().forward(mix)


class HangsOnTrueStereo(HTDemucs):
    """A hung forward pass (a driver that never returns) on any segment whose channels
    differ; tracks with identical channels, and the warm-up's silence, run normally."""

    def forward(self, mix):
        if any(not torch.equal(row[0], row[-1]) for row in mix):
            while True:
                time.sleep(3600)
        return super().forward(mix)
