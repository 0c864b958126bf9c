"""Stem folders on disk: one shared anti-clip gain, encoded files, published atomically."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.media.audio import OutputFormat, clip_gain, encode_stems


def finish_stems(stems: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply one shared anti-clip gain to all stems of a track."""
    gain = clip_gain(stems)
    if gain == 1.0:
        return stems
    return {name: audio * np.float32(gain) for name, audio in stems.items()}


def write_track(stems: dict[str, np.ndarray], sample_rate: int, out_dir: Path, name: str,
                fmt: OutputFormat) -> Path:
    """Encode `stems` into `out_dir/name/`, atomically replacing an older result."""
    return publish_folder(out_dir, name, lambda staging: encode_stems(finish_stems(stems), sample_rate, staging, fmt))


def publish_folder(out_dir: Path, name: str, fill: Callable[[Path], object]) -> Path:
    """Have `fill` write a folder, then move it to `out_dir/name/`, atomically replacing
    an older one; if `fill` fails, nothing is left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    staging = out_dir / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        fill(staging)
        if final.exists():
            old = out_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


