"""Stem folders on disk: one shared anti-clip gain, encoded files, published atomically."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.errors import StembotError
from core.media.audio import AudioFilters, OutputFormat, clip_gain, encode_stems

# In every folder stembot makes: only a folder carrying it is ever replaced.
MARKER = ".stembot"
MARKER_TEXT = "stembot made this folder; running stembot separate again with this --out replaces it.\n"


class FolderNotOursError(StembotError):
    """The output folder exists, was not made by stembot, and cannot take the stems."""

    kind = "folder_exists"


def finish_stems(stems: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply one shared anti-clip gain to all stems of a track."""
    gain = clip_gain(stems)
    if gain == 1.0:
        return stems
    return {name: audio * np.float32(gain) for name, audio in stems.items()}


def write_track(stems: dict[str, np.ndarray], sample_rate: int, out_dir: Path, name: str,
                fmt: OutputFormat, audio_filters: AudioFilters = ()) -> Path:
    """Encode `stems` into `out_dir/name/` (each through `audio_filters`), atomically
    replacing an older result (see `publish_folder`)."""
    return publish_folder(out_dir, name, lambda staging: encode_stems(finish_stems(stems), sample_rate, staging, fmt,
                                                                      audio_filters))


def publish_folder(out_dir: Path, name: str, fill: Callable[[Path], object]) -> Path:
    """Have `fill` write a folder, then publish it as `out_dir/name/`; if anything fails,
    nothing is left behind.

    stembot never deletes or changes a file it did not write: only a folder that carries
    `MARKER` (one that stembot made) is replaced, atomically. Any other file or folder of
    that name is the user's: the new files join the folder's files when none of their names
    is taken, else `FolderNotOursError`. The marker is never put in the user's folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    staging = out_dir / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        fill(staging)
        if made_by_stembot(final):
            _mark(staging)
            old = out_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        elif os.path.lexists(final):
            _add_beside(staging, final)
        else:
            _mark(staging)
            staging.rename(final)
    finally:
        # Gone already when it became `final`; what is left of it otherwise is ours.
        shutil.rmtree(staging, ignore_errors=True)
    return final


def made_by_stembot(folder: Path) -> bool:
    """Whether `folder` is a real folder (not a link) that stembot made."""
    marker = folder / MARKER
    return (folder.is_dir() and not folder.is_symlink()
            and marker.is_file() and not marker.is_symlink())


def _mark(folder: Path) -> None:
    (folder / MARKER).write_text(MARKER_TEXT)


def _add_beside(staging: Path, final: Path) -> None:
    """Move the files of `staging` into the user's folder `final`, never over a file of
    theirs; on any failure, remove the files moved so far (only those)."""
    refusal = FolderNotOursError(f"{final} exists and was not made by stembot; choose another --out")
    if not final.is_dir():
        raise refusal
    sources = sorted(staging.iterdir())
    if any(os.path.lexists(final / source.name) for source in sources):
        raise refusal
    placed: list[Path] = []
    try:
        for source in sources:
            _place(source, final / source.name, placed)
    except FileExistsError:
        # Made by someone else since the check above.
        _remove(placed)
        raise refusal from None
    except BaseException:
        _remove(placed)
        raise


def _place(source: Path, target: Path, placed: list[Path]) -> None:
    """Put `source` at `target`, raising FileExistsError rather than replacing a file
    (a rename would replace it silently); append `target` to `placed` once it is ours."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        # No hard link here (the folder is on another file system, or one without them):
        # copy into a file created exclusively.
        with open(source, "rb") as src, open(target, "xb") as dst:
            placed.append(target)
            shutil.copyfileobj(src, dst)
        return
    placed.append(target)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
