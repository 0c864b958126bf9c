"""A small picture of the stems: one waveform row per stem, in one colour each.

Drawn by a single ffmpeg process with `showwavespic` and `vstack`. No text is drawn,
since fonts may be missing on a server; colours tell the stems apart, and the bot
names them in the message beside the picture.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .audio import ALLOWED_DEMUXERS, BACKGROUND_NICE, PROTOCOLS, _lower_priority
from .errors import EncodeError

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


def preview_args(stem_files: dict[str, Path], out_png: Path, width: int = 800, row_height: int = 70) -> list[str]:
    """The ffmpeg command line that draws `stem_files` into `out_png`."""
    args = ["ffmpeg", "-nostdin", "-v", "error", "-y"]
    rows = []
    for index, (name, path) in enumerate(stem_files.items()):
        args += ["-protocol_whitelist", PROTOCOLS, "-format_whitelist", ALLOWED_DEMUXERS,
                 "-i", "file:" + str(Path(path).resolve())]
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


def render_preview(stem_files: dict[str, Path], out_png: Path, width: int = 800, row_height: int = 70) -> Path:
    """Draw each stem's waveform, stacked top to bottom in `stem_files` order, into `out_png`
    (width x row_height * stems pixels). Raises `EncodeError` if ffmpeg fails."""
    if not stem_files:
        raise EncodeError("there are no stems to draw")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # Drawn beside, then moved over, so a failure never leaves a half-written picture.
    partial = out_png.with_name(f".{out_png.name}.partial")
    args = preview_args(stem_files, partial.resolve(), width, row_height)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
