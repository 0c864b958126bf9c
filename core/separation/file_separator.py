"""Files in, stem folders out: decode -> separate -> encode for a batch of tracks.

The model is loaded once. On a GPU, while track N is being separated, track N+1 is
decoded and track N-1 is encoded (ffmpeg runs in its own processes), so the model is
rarely idle; on a CPU the steps run in turn (see `FileSeparator`).
Each track's stems are written to a hidden staging folder and moved into place only
when every stem is written: a failed track leaves nothing behind.
An input that is an http(s) link is downloaded with the safe fetcher (`core.net.fetcher`), under
the link rules it is given, into a temporary folder, decoded like a file, and deleted as soon as
it is decoded.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from core.errors import StembotError
from core.media.audio import Limits, MediaInfo, OutputFormat, decode, probe
from core.media.stem_files import write_track
from core.net.fetcher import FetchRules, download
from core.net.urls import is_link, output_name
from core.separation import blockwise
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import StemRequest

log = logging.getLogger(__name__)


@dataclass
class DecodedTrack:
    info: MediaInfo
    mix: np.ndarray  # float32, channels x samples, at the model's rate

    def duration_s(self, sample_rate: int) -> float:
        return self.mix.shape[1] / sample_rate


@dataclass
class TrackResult:
    input: str
    name: str
    folder: Path | None = None
    error: str | None = None
    audio_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class FileSeparatorEvents(Protocol):
    """Hooks for a progress display (`stembot separate` draws its bars with them). A
    subclass overrides the ones it needs; the others do nothing."""

    def track_started(self, index: int, result: TrackResult) -> None:
        return None

    def track_progress(self, index: int, fraction: float) -> None:
        return None

    def track_finished(self, index: int, result: TrackResult) -> None:
        return None


class _NoEvents(FileSeparatorEvents):
    """Nobody is watching."""


def prepare(path: str | Path, engine: SeparationEngine, limits: Limits,
            fetch_dir: Path | None = None,
            stage: Callable[[Path, MediaInfo], object | None] | None = None,
            link_rules: FetchRules = FetchRules()) -> DecodedTrack | object:
    """Probe, check limits, and decode one input for `engine`'s model. A link is first
    downloaded under `link_rules` into a temporary folder (under `fetch_dir`, or the system's), removed as
    soon as the audio is decoded or refused. `stage(path, info)`, if given, may take the
    file instead (a long track, decoded to disk by core.separation.blockwise): what it returns, if
    not None, is returned."""
    if is_link(path):
        with tempfile.TemporaryDirectory(prefix="stembot-fetch-", dir=fetch_dir) as folder:
            local = Path(folder) / "download"
            fetch_link(str(path), local, limits, link_rules)
            return prepare(local, engine, limits, stage=stage)
    info = probe(Path(path), limits)
    if stage is not None:
        staged = stage(Path(path), info)
        if staged is not None:
            return staged
    mix = decode(Path(path), engine.samplerate, engine.audio_channels, limits, info)
    return DecodedTrack(info, mix)


def fetch_link(url: str, dest: Path, limits: Limits, rules: FetchRules = FetchRules()) -> int:
    """Download `url` to `dest` with the safe fetcher under `rules` (from a worker thread: its own loop)."""
    return asyncio.run(download(url, dest, limits.max_input_bytes, rules=rules))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StembotError):
        return exc.reason
    log.error("unexpected failure", exc_info=exc)
    return f"internal error ({exc.__class__.__name__}); see the log"


class FileSeparator:
    """Separates many files with one engine, overlapping decode, separation and encode."""

    def __init__(self, engine: SeparationEngine, request: StemRequest, fmt: OutputFormat,
                 options: SeparationOptions = SeparationOptions(), limits: Limits = Limits(),
                 overlap_io: bool | None = None, block_s: float | None = blockwise.BLOCK_S,
                 blocks_above_s: float = blockwise.BLOCKS_ABOVE_S, link_rules: FetchRules = FetchRules()):
        self.engine = engine
        self.link_rules = link_rules  # where links among the inputs may be fetched from
        # Tracks over `blocks_above_s` go through core.separation.blockwise (None: never).
        self.block_s = block_s
        self.blocks_above_s = blocks_above_s
        self.request = request
        self.fmt = fmt
        self.options = options
        self.limits = limits
        # On a GPU the CPU is idle during separation, so ffmpeg work hides behind it. On
        # a CPU it competes with the model's threads, which stall at every parallel op
        # when one core is taken: measured on 2 cores, overlapped encoding cost more
        # separation time than it saved. There, each track runs decode -> separate ->
        # encode in turn (the stems of a track still encode in parallel processes).
        self.overlap_io = engine.device.type != "cpu" if overlap_io is None else overlap_io

    def run(self, inputs: Sequence[str | Path], out_dir: Path,
            events: FileSeparatorEvents | None = None) -> list[TrackResult]:
        events = events or _NoEvents()
        results = [TrackResult(str(p), output_name(p)) for p in inputs]
        first_use: dict[str, str] = {}
        for result in results:
            if result.name in first_use:
                result.error = f"output folder '{result.name}' is already used by {first_use[result.name]}"
            else:
                first_use[result.name] = result.input
        todo = [i for i, r in enumerate(results) if r.ok]

        with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder, \
                ThreadPoolExecutor(1, thread_name_prefix="encode") as encoder:
            def submit_decode(position: int) -> Future | None:
                if position >= len(todo):
                    return None
                # The input as given: a link must not go through Path, which folds its `//`.
                track_result = results[todo[position]]
                return decoder.submit(prepare, track_result.input, self.engine, self.limits,
                                      stage=lambda path, info: self._stage(path, info, out_dir, track_result.name),
                                      link_rules=self.link_rules)

            encodes: list[Future] = []
            next_decode = submit_decode(0)
            for position, index in enumerate(todo):
                result = results[index]
                events.track_started(index, result)
                current = next_decode
                next_decode = None
                try:
                    # Submitted for every position in `todo` before the loop reaches it.
                    assert current is not None, "no decode was submitted for this track"
                    track = current.result()
                    if self.overlap_io:
                        # Decode the next input while this one is separated.
                        next_decode = submit_decode(position + 1)
                    if isinstance(track, blockwise.StagedMix):
                        result.audio_s = track.duration_s
                        result.folder = self._blockwise(track, out_dir, result.name,
                                                        partial(events.track_progress, index))
                        events.track_finished(index, result)
                        continue
                    result.audio_s = track.duration_s(self.engine.samplerate)
                    stems = self.engine.separate(
                        track.mix, self.request, self.options,
                        progress=partial(events.track_progress, index),
                    )
                    del track
                    future = encoder.submit(write_track, stems, self.engine.samplerate, out_dir,
                                            result.name, self.fmt)
                    future.add_done_callback(partial(self._encoded, result=result, index=index, events=events))
                    encodes.append(future)
                    if not self.overlap_io:
                        wait([future])
                except Exception as exc:  # noqa: BLE001 - reported per track
                    result.error = _describe(exc)
                    events.track_finished(index, result)
                finally:
                    if next_decode is None:
                        next_decode = submit_decode(position + 1)
            wait(encodes)
        return results

    def _stage(self, path: Path, info: MediaInfo, out_dir: Path, name: str) -> blockwise.StagedMix | None:
        """Decode a long track to disk for `_blockwise` (None: not long)."""
        if not blockwise.use_blocks(info.duration_s, self.block_s, self.blocks_above_s):
            return None
        work = blockwise.work_dir(out_dir, name)
        try:
            return blockwise.stage_input(path, self.engine, self.limits, work, info)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def _blockwise(self, mix: blockwise.StagedMix, out_dir: Path, name: str, progress: blockwise.Progress) -> Path:
        # `_stage` stages a track (blockwise.use_blocks) only when block_s is set.
        assert self.block_s is not None, "a staged track without a block length"
        work = mix.path.parent
        try:
            stems = blockwise.separate_staged(mix, self.engine, self.request, self.options, work, progress=progress,
                                              block_s=self.block_s)
            mix.path.unlink()
            return blockwise.write_staged(stems, out_dir, name, self.fmt)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _encoded(future: Future, result: TrackResult, index: int, events: FileSeparatorEvents) -> None:
        exc = future.exception()
        if exc is None:
            result.folder = future.result()
        else:
            result.error = _describe(exc)
        events.track_finished(index, result)
