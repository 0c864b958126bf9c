"""A small picture of the stems: one waveform row per stem, in one colour each.

Drawn by a single ffmpeg process with `showwavespic` and `vstack`. No text is drawn,
since fonts may be missing on a server; colours tell the stems apart, and the bot
names them in the message beside the picture.

`showwavespic` keeps every decoded sample until the end of its input (it needs the
length to place the columns): for a 30-minute track, 1.3 GB for four stems. A `bounded`
preview first reads each stem in blocks and keeps only the loudest sample of every
`PEAK_FRAMES` per channel, then draws those: the same picture, in about 1/`PEAK_FRAMES`
of the memory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import BinaryIO

import numpy as np

from core.errors import EncodeError, StembotError
from core.helper_env import helper_env
from core.media.audio import ALLOWED_DEMUXERS, BACKGROUND_NICE, PROTOCOLS, Limits, _lower_priority, decode_stream, probe

# A bounded preview keeps the loudest sample of every this many frames.
PEAK_FRAMES = 256
# Any rate: showwavespic spreads its input over the width whatever the rate.
_PEAK_RATE = 44100
_PEAK_CHANNELS = 2

PREVIEW_TIMEOUT_S = 120.0
BACKGROUND = "0x1e1f22"  # Discord's dark theme, so the picture blends in
FALLBACK_COLOUR = "0xb5bac1"
STEM_COLOURS = {
    "vocals": "0xff5c8a",
    "drums": "0xffb347",
    "bass": "0x5ca8ff",
    "other": "0x7ed957",
    "guitar": "0xff6f3c",
    "piano": "0xc08cff",
    "no_vocals": "0x3ad6c5",
    "no_drums": "0xffd966",
    "no_bass": "0x9ec9ff",
    "no_other": "0xb7e89c",
}


def stem_colour(name: str) -> str:
    return STEM_COLOURS.get(name, FALLBACK_COLOUR)


def preview_args(stem_files: dict[str, Path], out_png: Path, width: int = 800, row_height: int = 70,
                 peaks: bool = False) -> list[str]:
    """The ffmpeg command line that draws `stem_files` into `out_png` (`peaks`: the files
    are raw float32 stereo peaks, from `write_peaks`)."""
    args = ["ffmpeg", "-nostdin", "-v", "error", "-y"]
    rows = []
    for index, (name, path) in enumerate(stem_files.items()):
        if peaks:
            args += ["-protocol_whitelist", PROTOCOLS, "-f", "f32le", "-ar", str(_PEAK_RATE),
                     "-ac", str(_PEAK_CHANNELS)]
        else:
            args += ["-protocol_whitelist", PROTOCOLS, "-format_whitelist", ALLOWED_DEMUXERS]
        args += ["-i", "file:" + str(Path(path).resolve())]
        colour = stem_colour(name)
        # Channels drawn over each other in one colour; peaks, not averages, or a noisy
        # stem averages out to a flat line. sqrt lifts quiet stems into view.
        rows.append(
            f"[{index}:a]showwavespic=s={width}x{row_height}:split_channels=0:"
            f"colors={colour}|{colour}:scale=sqrt:draw=full:filter=peak[w{index}]"
        )
    count = len(stem_files)
    stacked = "".join(f"[w{i}]" for i in range(count))
    stack = f"{stacked}vstack=inputs={count}[waves]" if count > 1 else "[w0]null[waves]"
    graph = ";".join([
        *rows,
        stack,
        f"color=c={BACKGROUND}:s={width}x{row_height * count}[bg]",
        # rgb24 drops the alpha channel: smaller file, and no transparency surprises.
        "[bg][waves]overlay=format=auto:shortest=1,format=rgb24[out]",
    ])
    args += ["-filter_complex", graph, "-map", "[out]", "-frames:v", "1", "-update", "1",
             "-c:v", "png", "-f", "image2", "file:" + str(out_png)]
    return args


def write_peaks(path: Path, out: Path, frames: int | None = None) -> Path:
    """Decode `path` in blocks and write, per channel, the sample of largest magnitude
    (sign kept) of every `frames` (default `PEAK_FRAMES`) frames to `out` as raw float32
    stereo."""
    frames = frames or PEAK_FRAMES
    limits = Limits(min_duration_s=0.0, max_duration_s=24 * 3600.0, max_input_bytes=2**62)
    info = probe(Path(path), limits)
    with open(out, "wb") as file:
        sink = _PeakSink(file, frames)
        decode_stream(Path(path), info.sample_rate, _PEAK_CHANNELS, sink, limits, info)
        sink.finish()
    return out


class _PeakSink:
    def __init__(self, file: BinaryIO, frames: int) -> None:
        self.file = file
        self.frames = frames
        self.pending = b""

    def __call__(self, chunk: bytes) -> None:
        data = self.pending + chunk
        bucket_bytes = self.frames * _PEAK_CHANNELS * 4
        whole = len(data) - len(data) % bucket_bytes
        self.pending = data[whole:]
        self._write(np.frombuffer(data, dtype="<f4", count=whole // 4))

    def finish(self) -> None:
        frame_bytes = _PEAK_CHANNELS * 4
        usable = len(self.pending) - len(self.pending) % frame_bytes
        self._write(np.frombuffer(self.pending, dtype="<f4", count=usable // 4))
        self.pending = b""

    def _write(self, samples: np.ndarray) -> None:
        frames = samples.reshape(-1, _PEAK_CHANNELS)
        if not len(frames):
            return
        buckets = -(-len(frames) // self.frames)
        padded = np.zeros((buckets * self.frames, _PEAK_CHANNELS), dtype=np.float32)
        padded[:len(frames)] = frames
        grouped = padded.reshape(buckets, self.frames, _PEAK_CHANNELS)
        loudest = np.abs(grouped).argmax(axis=1)
        np.take_along_axis(grouped, loudest[:, None, :], axis=1)[:, 0, :].astype("<f4").tofile(self.file)


def render_preview(stem_files: dict[str, Path], out_png: Path, width: int = 800, row_height: int = 70,
                   bounded: bool = False) -> Path:
    """Draw each stem's waveform, stacked top to bottom in `stem_files` order, into `out_png`
    (width x row_height * stems pixels). Raises `EncodeError` if ffmpeg fails. `bounded`:
    draw from peaks read blockwise (long tracks; see the module's notes)."""
    if not stem_files:
        raise EncodeError("there are no stems to draw")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if bounded:
        peak_files = {name: out_png.with_name(f".{out_png.name}.{index}.peaks")
                      for index, name in enumerate(stem_files)}
        try:
            for name, path in stem_files.items():
                try:
                    write_peaks(path, peak_files[name])
                except StembotError as exc:
                    raise EncodeError(f"drawing the preview failed: {exc.reason}") from None
            return _draw(peak_files, out_png, width, row_height, peaks=True)
        finally:
            for path in peak_files.values():
                path.unlink(missing_ok=True)
    return _draw(stem_files, out_png, width, row_height)


def _draw(stem_files: dict[str, Path], out_png: Path, width: int, row_height: int, peaks: bool = False) -> Path:
    # Drawn beside, then moved over, so a failure never leaves a half-written picture.
    partial = out_png.with_name(f".{out_png.name}.partial")
    args = preview_args(stem_files, partial.resolve(), width, row_height, peaks)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=helper_env())
    _lower_priority(proc.pid, BACKGROUND_NICE)
    try:
        _, stderr = proc.communicate(timeout=PREVIEW_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        partial.unlink(missing_ok=True)
        raise EncodeError("drawing the preview took too long") from None
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        detail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
        raise EncodeError(f"drawing the preview failed: {detail[0]}")
    os.replace(partial, out_png)
    return out_png
