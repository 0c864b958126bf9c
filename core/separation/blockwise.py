"""Long tracks in bounded memory: decode, separate and encode in blocks.

The whole-track path holds the decoded mix and every stem in memory at once (a
30-minute stereo track: 635 MB of input and 2.5 GB for four stems, plus demucs's own
buffers of the same size). Past `BLOCKS_ABOVE_S` of audio the same work is done with
nothing track-sized in RAM:

1. decode: ffmpeg streams the mix (same process, limits and checks as `core.media.audio.decode`)
   into a float32 file in a work folder, while the whole track's mean and spread, which
   demucs normalises by, are summed up;
2. separate: blocks of about `BLOCK_S` seconds are read back and separated with the whole
   track's stats and `context` samples of audio on both sides (the longest model segment
   plus demucs's largest random shift). Block starts fall on the model's segment grid, so
   every model segment that reaches the kept part of a block is exactly the segment the
   whole track has there: with shifts=0 the stems equal the whole track's up to float
   rounding. Neighbouring blocks are cross-faded over `CROSSFADE_S`, which smooths the
   seam that random shifts (shifts>0, different in each block) would leave. Each stem is
   appended to its own float32 file and its largest sample is kept;
3. encode: one shared anti-clip gain from that peak (as `clip_gain`, so the stems still
   sum to the mix), then every stem streams from its file into its own ffmpeg.

The cost: every block boundary separates `2 * context + crossfade` samples twice (about
17.6 s for htdemucs, +15% work with 120 s blocks); the disk holds the input and the
stems as float32 while a job runs (about 0.35 GB per 10 minutes per stereo stem).

The work folder sits beside the stems folder and is named like an encode's staging
folder (`.<name>.partial-blocks-...`), so the sweeper removes it if the process dies;
otherwise it is removed on success, failure and cancel alike.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from core.errors import JobCancelled
from core.media.audio import AudioFilters, decode_stream, encode_stream, gain_for_peak, probe
from core.media.stem_files import publish_folder

if TYPE_CHECKING:
    from core.media.audio import Limits, MediaInfo, OutputFormat
    from core.separation.engine import SeparationEngine, SeparationOptions
    from core.separation.stems import StemRequest

# Seconds of audio each block adds to the output; a block separates this plus context.
BLOCK_S = 120.0
# Tracks up to this long take the whole-track path: nothing changes for ordinary songs.
BLOCKS_ABOVE_S = 2.5 * BLOCK_S
# Neighbouring blocks are cross-faded over this many seconds.
CROSSFADE_S = 1.0
# demucs's largest random shift (`apply_model`: 0.5 s); context covers it too.
SHIFT_MARGIN_S = 0.5
# Samples are read, written and encoded this many seconds at a time.
CHUNK_S = 10.0

Progress = Callable[[float], None]
CancelCheck = Callable[[], bool]


def use_blocks(duration_s: float | None, block_s: float | None = BLOCK_S,
               above_s: float = BLOCKS_ABOVE_S) -> bool:
    """Whether a track of `duration_s` (None: the container does not say) goes blockwise."""
    return block_s is not None and (duration_s is None or duration_s > above_s)


def work_dir(out_dir: Path, name: str) -> Path:
    """A fresh work folder for the stems folder `out_dir/name`, beside it."""
    folder = Path(out_dir) / f".{name}.partial-blocks-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder


# -- decode ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedMix:
    """A decoded mix on disk: interleaved float32, `frames` x `channels`."""

    path: Path
    frames: int
    channels: int
    sample_rate: int
    mean: float  # the whole track's, as `core.separation.engine._mono_stats`
    std: float
    info: MediaInfo

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) as float32, channels x samples."""
        return _read_frames(self.path, self.channels, start, stop)

    def load(self) -> np.ndarray:
        """The whole mix, as `core.media.audio.decode` returns it."""
        return self.read(0, self.frames)


class _Stats:
    """A `decode_stream` sink: writes the bytes to a file and sums the mono mix."""

    def __init__(self, file: BinaryIO, channels: int):
        self.file = file
        self.channels = channels
        self.pending = b""
        self.frames = 0
        self.total = 0.0
        self.squares = 0.0

    def __call__(self, chunk: bytes) -> None:
        self.file.write(chunk)
        data = self.pending + chunk
        frame_bytes = 4 * self.channels
        whole = len(data) - len(data) % frame_bytes
        self.pending = data[whole:]
        frames = np.frombuffer(data, dtype="<f4", count=whole // 4).reshape(-1, self.channels)
        # As torch's `wav.mean(0)` in float32, then summed in float64.
        mono = frames.mean(axis=1, dtype=np.float32).astype(np.float64)
        self.frames += len(mono)
        self.total += float(mono.sum())
        self.squares += float(np.dot(mono, mono))

    def mean_std(self, frames: int) -> tuple[float, float]:
        mean = self.total / frames
        variance = max(0.0, (self.squares - self.total * mean) / max(1, frames - 1))  # unbiased, as torch
        return mean, math.sqrt(variance) + 1e-8


def stage_input(path: Path, engine: SeparationEngine, limits: Limits, work: Path,
                info: MediaInfo | None = None) -> StagedMix:
    """Decode `path` for `engine`'s model into `work/mix.f32`, with the whole track's stats."""
    info = info or probe(Path(path), limits)
    target = Path(work) / "mix.f32"
    with open(target, "wb") as file:
        stats = _Stats(file, engine.audio_channels)
        frames = decode_stream(Path(path), engine.samplerate, engine.audio_channels, stats, limits, info)
    if stats.frames != frames:  # decode_stream counts whole frames as the sink does
        raise RuntimeError(f"decoded {frames} frames but staged {stats.frames}")
    mean, std = stats.mean_std(frames)
    return StagedMix(target, frames, engine.audio_channels, engine.samplerate, mean, std, info)


def _read_frames(path: Path, channels: int, start: int, stop: int) -> np.ndarray:
    # Plain reads, not a memory map: mapped pages would count as this process's memory.
    count = (stop - start) * channels
    with open(path, "rb") as file:
        file.seek(start * channels * 4)
        data = np.fromfile(file, dtype="<f4", count=count)
    if data.size != count:
        raise OSError(f"{path.name}: expected {count} samples at frame {start}, read {data.size}")
    return data.reshape(-1, channels).T.astype(np.float32, order="C")


# -- separate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """Separate input frames [start, stop); keep output frames [keep_from, keep_to). The
    first/last crossfade frames of what is kept are shared with the previous/next block."""

    start: int
    stop: int
    keep_from: int
    keep_to: int


def plan_blocks(frames: int, block: int, context: int, crossfade: int, stride: int) -> list[Block]:
    """Cut `frames` into about `block`-frame blocks. Every block but the first starts on
    the `stride` grid and keeps nothing in its first `context` frames; every block but the
    last has `context` frames after what it keeps."""
    if block < 2 * (stride + 2 * crossfade):
        raise ValueError(f"blocks of {block} frames are too short for a segment stride of {stride}")
    count = max(1, math.ceil(frames / block))
    if count == 1:
        return [Block(0, frames, 0, frames)]
    starts = [0] + [(round(k * frames / count) - crossfade // 2 - context) // stride * stride
                    for k in range(1, count)]
    blocks = []
    for k, start in enumerate(starts):
        last = k == count - 1
        keep_from = 0 if k == 0 else start + context
        keep_to = frames if last else starts[k + 1] + context + crossfade
        stop = frames if last else min(frames, keep_to + context)
        blocks.append(Block(start, stop, keep_from, keep_to))
    for before, after in pairwise(blocks):
        if not (before.keep_from + crossfade <= after.keep_from and before.keep_to + crossfade <= after.keep_to):
            raise ValueError(f"blocks of {block} frames are too short for {frames} frames")
    return blocks


def model_grid(engine: SeparationEngine, request: StemRequest, options: SeparationOptions
               ) -> tuple[int, int]:
    """(stride, context) in frames for the models that `engine` runs for `request`:
    `apply_model`'s segment stride of the first model, and the longest segment plus the
    largest random shift. An engine with its own grid (a checkpoint model's chunks) says it."""
    own_grid = getattr(engine, "block_grid", None)
    if own_grid is not None:
        grid: tuple[int, int] = own_grid(options)
        return grid
    from demucs.apply import BagOfModels  # noqa: PLC0415 - demucs loads only when a model runs

    from core.separation.batching import bag_members  # noqa: PLC0415 - it imports torch; this module stays light

    model = engine._plan(request.direct_sources).model
    subs = bag_members(model) if isinstance(model, BagOfModels) else [model]
    # As apply_model computes them (the segment may be a Fraction).
    lengths = [int(sub.samplerate * (options.segment if options.segment is not None else sub.segment))
               for sub in subs]
    stride = int((1 - options.overlap) * lengths[0])
    return stride, max(lengths) + int(SHIFT_MARGIN_S * engine.samplerate)


def staged_stem(stems: StagedStems, name: str, info: MediaInfo) -> StagedMix:
    """Stem `name` of staged stems as a staged mix, with its whole length's stats, for a
    second model to separate (a chain); read from disk a chunk at a time."""
    path = stems.paths[name]
    with open(os.devnull, "wb") as sink:
        stats = _Stats(sink, stems.channels)
        with open(path, "rb") as file:
            while chunk := file.read(1 << 22):
                stats(chunk)
    mean, std = stats.mean_std(max(1, stats.frames))
    return StagedMix(path, stems.frames, stems.channels, stems.sample_rate, mean, std, info)


@dataclass(frozen=True)
class StagedStems:
    """Separated stems on disk, each interleaved float32, `frames` x `channels`."""

    paths: dict[str, Path]
    frames: int
    channels: int
    sample_rate: int
    peak: float  # the largest absolute sample of all stems

    @property
    def names(self) -> list[str]:
        return list(self.paths)


class BlockStitcher:
    """A staged mix's blocks, separated one after another by any means: each block's
    stems are cross-faded into the previous block's and appended to one file per stem in
    `work`. Holds one block's audio at a time."""

    def __init__(self, mix: StagedMix, engine: SeparationEngine, request: StemRequest,
                 options: SeparationOptions, work: Path, block_s: float = BLOCK_S,
                 crossfade_s: float = CROSSFADE_S):
        stride, context = model_grid(engine, request, options)
        self.mix = mix
        self.work = Path(work)
        self.crossfade = 2 * max(1, int(crossfade_s * mix.sample_rate) // 2)
        self.blocks = plan_blocks(mix.frames, int(block_s * mix.sample_rate), context, self.crossfade, stride)
        self.total = sum(b.stop - b.start for b in self.blocks)
        self.fade_in = ((np.arange(self.crossfade, dtype=np.float64) + 0.5) / self.crossfade).astype(np.float32)
        self.fade_out = np.float32(1) - self.fade_in
        self.index = 0  # the next block to separate
        self.done = 0  # frames of the blocks added
        self.paths: dict[str, Path] = {}
        self.peak = 0.0
        self._tail: dict[str, np.ndarray] = {}
        self._files = ExitStack()
        self._outputs: dict[str, BinaryIO] = {}

    @property
    def finished(self) -> bool:
        return self.index == len(self.blocks)

    @property
    def stats(self) -> tuple[float, float]:
        """The whole track's mean and spread: every block is normalised by them."""
        return self.mix.mean, self.mix.std

    def audio(self) -> np.ndarray:
        """The next block's mix, its context included."""
        block = self.blocks[self.index]
        return self.mix.read(block.start, block.stop)

    def fraction(self, within: float) -> float:
        """The whole track's share done when the next block is `within` done."""
        block = self.blocks[self.index]
        return min((self.done + within * (block.stop - block.start)) / self.total, 0.999)

    def add(self, stems: dict[str, np.ndarray]) -> None:
        """The next block's stems; they are popped from `stems` as they are written."""
        block = self.blocks[self.index]
        crossfade = self.crossfade
        if not self._outputs:
            for name in stems:
                self.paths[name] = self.work / f"{name}.f32"
                self._outputs[name] = self._files.enter_context(open(self.paths[name], "wb"))
        first, last = self.index == 0, self.index == len(self.blocks) - 1
        for name in list(stems):
            # Popped, so that no view of this block's output outlives this call and
            # doubles the memory held while the next block is separated.
            kept = stems.pop(name)[:, block.keep_from - block.start:block.keep_to - block.start]
            if not first:
                faded = self._tail.pop(name) * self.fade_out + kept[:, :crossfade] * self.fade_in
                self.peak = _append(self._outputs[name], faded, self.peak)
                kept = kept[:, crossfade:]
            if not last:
                self._tail[name] = kept[:, -crossfade:].copy()
                kept = kept[:, :-crossfade]
            self.peak = _append(self._outputs[name], kept, self.peak)
            del kept
        self.index += 1
        self.done += block.stop - block.start

    def close(self) -> None:
        self._files.close()

    def result(self) -> StagedStems:
        """The stems on disk, once `finished`."""
        self.close()
        mix = self.mix
        return StagedStems(self.paths, mix.frames, mix.channels, mix.sample_rate, self.peak)


def separate_staged(
    mix: StagedMix,
    engine: SeparationEngine,
    request: StemRequest,
    options: SeparationOptions,
    work: Path,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
    block_s: float = BLOCK_S,
    crossfade_s: float = CROSSFADE_S,
) -> StagedStems:
    """Separate a staged mix block by block into `work/<stem>.f32`. `progress` gets the
    fraction of the whole track's blocks; `should_cancel` is checked between blocks and
    around every model segment (JobCancelled)."""
    stitcher = BlockStitcher(mix, engine, request, options, work, block_s, crossfade_s)

    def block_progress(fraction: float) -> None:
        if progress is not None:  # always true: block_progress is passed only when progress is set
            progress(stitcher.fraction(fraction))

    try:
        while not stitcher.finished:
            if should_cancel is not None and should_cancel():
                raise JobCancelled()
            stitcher.add(engine.separate(stitcher.audio(), request, options,
                                         progress=block_progress if progress else None,
                                         should_cancel=should_cancel, stats=stitcher.stats))
    finally:
        stitcher.close()
    if progress is not None:
        progress(1.0)
    return stitcher.result()


def _append(file: BinaryIO, audio: np.ndarray, peak: float) -> float:
    """Append channels x samples to `file` as interleaved float32; the new peak."""
    step = 1 << 19
    for start in range(0, audio.shape[1], step):
        frames = np.ascontiguousarray(audio[:, start:start + step].T, dtype="<f4")
        if frames.size:
            peak = max(peak, float(np.max(np.abs(frames))))
        frames.tofile(file)
    return peak


# -- encode ---------------------------------------------------------------------------------


def encode_staged(stems: StagedStems, folder: Path, fmt: OutputFormat,
                  audio_filters: AudioFilters = ()) -> dict[str, Path]:
    """Write each stem to `folder/<stem>.<ext>` with one shared anti-clip gain (as
    `core.separation.file_separator.finish_stems`), one ffmpeg per stem, all at once, each
    through `audio_filters`."""
    gain = gain_for_peak(stems.peak)
    folder.mkdir(parents=True, exist_ok=True)
    targets = {name: folder / f"{name}.{fmt.extension}" for name in stems.paths}
    with ThreadPoolExecutor(max_workers=max(1, len(targets)), thread_name_prefix="encode") as pool:
        futures = [pool.submit(encode_stream, _chunks(stems.paths[name], stems.channels, stems.sample_rate, gain),
                               stems.channels, stems.sample_rate, target, fmt, audio_filters)
                   for name, target in targets.items()]
        for future in futures:
            future.result()
    return targets


def _chunks(path: Path, channels: int, sample_rate: int, gain: float) -> Iterator[bytes]:
    count = int(sample_rate * CHUNK_S) * channels
    with open(path, "rb") as file:
        while True:
            data = np.fromfile(file, dtype="<f4", count=count)
            if not data.size:
                return
            if gain != 1.0:
                data = data * np.float32(gain)
            yield data.tobytes()


def write_staged(stems: StagedStems, out_dir: Path, name: str, fmt: OutputFormat,
                 audio_filters: AudioFilters = ()) -> Path:
    """`core.separation.file_separator.write_track` for staged stems: encode into `out_dir/name/`, atomically."""
    return publish_folder(Path(out_dir), name, lambda staging: encode_staged(stems, staging, fmt, audio_filters))


# -- all of it ------------------------------------------------------------------------------


def separate_file(
    path: Path,
    engine: SeparationEngine,
    request: StemRequest,
    options: SeparationOptions,
    limits: Limits,
    out_dir: Path,
    name: str,
    fmt: OutputFormat,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
    block_s: float = BLOCK_S,
    info: MediaInfo | None = None,
) -> Path:
    """Decode, separate and encode `path` blockwise into `out_dir/name/`; the work folder
    is removed whatever happens."""
    work = work_dir(out_dir, name)
    try:
        mix = stage_input(path, engine, limits, work, info)
        stems = separate_staged(mix, engine, request, options, work, progress, should_cancel, block_s)
        Path(mix.path).unlink()
        return write_staged(stems, out_dir, name, fmt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
