"""Rendering a job's stems another way: at another speed or key (rubberband, through
ffmpeg's `rubberband` filter, as the stems are encoded) and mixed down to one file of
chosen stems at chosen volumes.

A job keeps these options in one text column (`jobs.render_options`), canonical JSON or
"" for plain stems, so that the results cache can compare them as text (see
`core.jobs.store.JobStore.find_cached`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import BadRequestError
from core.media.audio import AudioFilters, gain_for_peak, sum_shortest

TEMPO_MIN, TEMPO_MAX = 50, 150  # percent of the original speed
TRANSPOSE_MIN, TRANSPOSE_MAX = -12, 12  # semitones
VOLUME_MIN, VOLUME_MAX = 0, 200  # percent of a stem's level in the mix
LIMIT = 0.98  # the limiter after rubberband: the highest absolute sample it lets out
MIX = "mix"  # the stem name (and file name, `mix.<ext>`) of a mix
MAX_MIX_STEMS = 16
_STEM_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VOLUME = re.compile(r"([A-Za-z][A-Za-z0-9_]{0,31})\s*[=:]\s*([+-]?\d{1,4})\s*%?")


@dataclass(frozen=True)
class RenderOptions:
    """How a job's stems are rendered; the default renders them as separated."""

    tempo: int = 100  # percent of the original speed
    transpose: int = 0  # semitones, up or down
    mix: tuple[tuple[str, int], ...] | None = None  # (stem, volume %) mixed into one file; None: the stems

    def __post_init__(self) -> None:
        check_tempo(self.tempo)
        check_transpose(self.transpose)
        if self.mix is not None:
            if not self.mix or len(self.mix) > MAX_MIX_STEMS:
                raise BadRequestError("a mix needs at least one stem")
            names = [name for name, _ in self.mix]
            if len(set(names)) != len(names) or not all(_STEM_NAME.fullmatch(name) for name in names):
                raise BadRequestError("a mix names each stem once, by its plain name")
            for name, volume in self.mix:
                check_volume(name, volume)

    @property
    def plain(self) -> bool:
        return self.tempo == 100 and self.transpose == 0 and self.mix is None

    @property
    def stretches(self) -> bool:
        """Whether the audio goes through rubberband."""
        return self.tempo != 100 or self.transpose != 0

    @property
    def speed(self) -> float:
        return self.tempo / 100

    @property
    def pitch(self) -> float:
        """The pitch ratio of `transpose` semitones (equal temperament)."""
        return float(2.0 ** (self.transpose / 12))

    def rendered_length(self, duration_s: float) -> float:
        """How long a track of `duration_s` is once rendered at this tempo."""
        return duration_s / self.speed

    def audio_filters(self) -> AudioFilters:
        """The ffmpeg filters that render a stem (none for plain stems).

        rubberband with `pitchq=quality` (the highest quality pitch shifting); transients
        stay `crisp` (the default), which keeps drums and plucks sharp at another tempo.
        Time-stretching can raise a peak over the one the anti-clip gain allowed for (a
        third more, measured on a tone shifted an octave), so a look-ahead limiter with its
        delay compensated keeps every sample under full scale; below `LIMIT` it changes nothing."""
        if not self.stretches:
            return ()
        return (("rubberband", {"tempo": f"{self.speed:.6g}", "pitch": f"{self.pitch:.10g}", "pitchq": "quality"}),
                ("alimiter", {"limit": LIMIT, "level": 0, "latency": 1}))

    def describe(self) -> str:
        """What the user reads: "at 80% speed, +2 semitones" ("" when nothing changes the sound)."""
        parts = []
        if self.tempo != 100:
            parts.append(f"at {self.tempo}% speed")
        if self.transpose:
            unit = "semitone" if abs(self.transpose) == 1 else "semitones"
            parts.append(f"{self.transpose:+d} {unit}")
        return ", ".join(parts)

    def describe_mix(self) -> str:
        """The mix's recipe: "vocals 50%, bass, other" (volumes other than 100% are shown)."""
        if self.mix is None:
            return ""
        return ", ".join(name if volume == 100 else f"{name} {volume}%" for name, volume in self.mix)

    def to_column(self) -> str:
        """Canonical text: equal options make equal text (the results cache compares it)."""
        if self.plain:
            return ""
        value: dict[str, Any] = {}
        if self.tempo != 100:
            value["tempo"] = self.tempo
        if self.transpose:
            value["transpose"] = self.transpose
        if self.mix is not None:
            value["mix"] = [[name, volume] for name, volume in self.mix]
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_column(cls, text: str | None) -> RenderOptions:
        """The options a job's column holds; BadRequestError when they are not options."""
        if not text:
            return cls()
        try:
            value = json.loads(text)
        except ValueError:
            raise BadRequestError("the job's render options are not readable") from None
        if not isinstance(value, dict) or not set(value) <= {"tempo", "transpose", "mix"}:
            raise BadRequestError("the job's render options are not readable")
        tempo, transpose, mix = value.get("tempo", 100), value.get("transpose", 0), value.get("mix")
        if type(tempo) is not int or type(transpose) is not int:
            raise BadRequestError("the job's render options are not readable")
        pairs = None
        if mix is not None:
            if not isinstance(mix, list) or not all(
                    isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int for p in mix):
                raise BadRequestError("the job's render options are not readable")
            pairs = tuple((str(name), int(volume)) for name, volume in mix)
        return cls(tempo=tempo, transpose=transpose, mix=pairs)


def check_tempo(tempo: int) -> None:
    if type(tempo) is not int or not TEMPO_MIN <= tempo <= TEMPO_MAX:
        raise BadRequestError(f"tempo is a percentage of the original speed, from {TEMPO_MIN} to {TEMPO_MAX}")


def check_transpose(transpose: int) -> None:
    if type(transpose) is not int or not TRANSPOSE_MIN <= transpose <= TRANSPOSE_MAX:
        raise BadRequestError(f"transpose is a number of semitones, from {TRANSPOSE_MIN} to +{TRANSPOSE_MAX}")


def check_volume(name: str, volume: int) -> None:
    if type(volume) is not int or not VOLUME_MIN <= volume <= VOLUME_MAX:
        raise BadRequestError(f"the volume of {name} must be from {VOLUME_MIN} to {VOLUME_MAX} (percent)")


def parse_volumes(text: str | None) -> dict[str, int]:
    """`"vocals=50 bass=100"` (or with commas, or `vocals:50%`) -> {"vocals": 50, "bass": 100}.
    BadRequestError for anything else, naming what was not understood."""
    volumes: dict[str, int] = {}
    rest = (text or "").strip()
    position = 0
    while position < len(rest):
        if rest[position] in " ,;\t":
            position += 1
            continue
        match = _VOLUME.match(rest, position)
        if match is None:
            raise BadRequestError(f"volumes are written like `vocals=50 bass=120`; "
                                  f"`{shown_text(rest[position:position + 20])}` is not")
        name, volume = match.group(1).lower(), int(match.group(2))
        if name in volumes:
            raise BadRequestError(f"volumes name {name} twice")
        check_volume(name, volume)
        volumes[name] = volume
        position = match.end()
    return volumes


def shown_text(text: str) -> str:
    """A piece of what a member typed, fit to quote back: letters, digits and `_=:%+-` only
    (no mention, no markdown)."""
    return re.sub(r"[^A-Za-z0-9_=:%+-]", "", text)[:20] or "?"


def mix_stems(stems: Mapping[str, np.ndarray], mix: Sequence[tuple[str, int]]) -> np.ndarray:
    """The chosen stems (channels x samples) summed at their volumes, with the anti-clip
    gain applied (`core.media.audio.gain_for_peak`): the mix never clips."""
    out: np.ndarray | None = None
    for name, volume in mix:
        part = stems[name] * np.float32(volume / 100)
        out = part.astype(np.float32) if out is None else out + part
    assert out is not None  # RenderOptions holds at least one stem in a mix
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    gain = gain_for_peak(peak)
    return out if gain == 1.0 else out * np.float32(gain)


def mix_files(paths: Mapping[str, Path], mix: Sequence[tuple[str, int]], target: Path,
              channels: int, sample_rate: int, chunk_s: float = 10.0) -> float:
    """`mix_stems` for stems on disk (interleaved float32 files of equal length), a chunk at
    a time: writes the mix to `target` and returns its largest absolute sample (the caller
    applies the anti-clip gain as it encodes)."""
    count = max(1, int(sample_rate * chunk_s)) * channels
    peak = 0.0
    with open(target, "wb") as out:
        for chunk in _mixed_chunks(paths, mix, count):
            if chunk.size:
                peak = max(peak, float(np.max(np.abs(chunk))))
            chunk.astype("<f4").tofile(out)
    return peak


def _mixed_chunks(paths: Mapping[str, Path], mix: Sequence[tuple[str, int]], count: int) -> Iterator[np.ndarray]:
    files = [(open(paths[name], "rb"), np.float32(volume / 100)) for name, volume in mix]
    try:
        while True:
            parts = [np.fromfile(file, dtype="<f4", count=count) * volume for file, volume in files]
            length = min(part.size for part in parts)
            if not length:
                return
            yield sum_shortest(parts)
    finally:
        for file, _ in files:
            file.close()

