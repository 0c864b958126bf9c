"""Tempo (BPM) and musical key of a track, computed once from its stems with librosa.

Tempo: librosa's onset-strength envelope and its tempo estimate (autocorrelation of the
envelope under a prior centred on 120 BPM), made precise between envelope frames, on every
stem together (the mix: on the benchmark's material the chords' onsets helped, 72% hits
against 65% from the drums and bass alone). Key: a constant-Q chromagram of every stem
but the drums, summed over time and correlated with the Krumhansl-Kessler major and minor
profiles in all 24 keys (the Krumhansl-Schmuckler algorithm); the best correlation wins.

Cost is bounded whatever the track's length: at most `WINDOW_S` seconds from the middle
of the track, mixed to mono and resampled to `ANALYSIS_RATE` first. librosa compiles some
of its functions with numba on first use (5-30 s); a model host pays that once, when it
starts (`warm_up`). bench/tempo_key_accuracy.py measures the hit rates; docs/performance.md
has them and the known limits (half or double tempo, relative major/minor, ...).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# librosa loads its submodules (and numba, scipy) on first use: importing it is cheap, so
# the bot, which only checks and shows the results, never pays for them.
import librosa
import numpy as np

from core.media.audio import sum_shortest

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# "C major" .. "B major", then "C minor" .. "B minor".
KEY_NAMES = tuple(f"{pitch} {mode}" for mode in ("major", "minor") for pitch in PITCH_CLASSES)
MIN_BPM = 30.0
MAX_BPM = 300.0

ANALYSIS_RATE = 22050
WINDOW_S = 120.0  # the most of a track analysed, from its middle
_HOP = 512
# Below this peak level (about -60 dBFS) a window is silence: no tempo, no key.
_SILENCE = 1e-3
# Krumhansl and Kessler's probe-tone ratings (1982), from the tonic up.
_MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
# Stems without harmony: left out of the key (a drums-only track has none).
_PERCUSSION_STEMS = ("drums",)


@dataclass(frozen=True)
class TrackAnalysis:
    """A track's tempo in beats per minute and its key ("A minor"); None when not found."""

    bpm: float | None
    key: str | None

    def artifact(self) -> dict[str, Any]:
        """What the job's `artifacts` keep under "analysis" (only the values found)."""
        found: dict[str, Any] = {}
        if self.bpm is not None:
            found["bpm"] = self.bpm
        if self.key is not None:
            found["key"] = self.key
        return found

    def rendered(self, tempo_percent: int, semitones: int) -> TrackAnalysis:
        """The tempo and key of the track played at `tempo_percent` of its speed and moved by
        `semitones`: what a member hears in stems rendered with `/split tempo: transpose:`."""
        bpm = None if self.bpm is None else round(self.bpm * tempo_percent / 100, 1)
        key = self.key
        if key is not None and semitones:
            pitch, mode = key.split(" ")
            key = f"{PITCH_CLASSES[(PITCH_CLASSES.index(pitch) + semitones) % 12]} {mode}"
        return TrackAnalysis(bpm=bpm, key=key)

    def describe(self) -> str:
        """"123 BPM · A minor", or whichever half is known; "" when neither. Whole beats per
        minute, as musicians say them: the tenth kept in `bpm` is within the estimate's noise."""
        parts = []
        if self.bpm is not None:
            parts.append(f"{round(self.bpm)} BPM")
        if self.key is not None:
            parts.append(self.key)
        return " · ".join(parts)


def window(frames: int, sample_rate: int, window_s: float = WINDOW_S) -> slice:
    """The frames analysed of a track of `frames`: all of it, or `window_s` from its middle
    (an intro or an outro is often without drums or in another key)."""
    length = int(window_s * sample_rate)
    if frames <= length:
        return slice(0, frames)
    start = (frames - length) // 2
    return slice(start, start + length)


def analyse_stems(stems: Mapping[str, np.ndarray], sample_rate: int) -> TrackAnalysis:
    """Tempo and key of a track from its stems (name -> channels x samples, or samples),
    each already cut to the frames to analyse (see `window`)."""
    if not stems:
        return TrackAnalysis(None, None)
    mono = {name: _mono(audio) for name, audio in stems.items()}
    harmony = [audio for name, audio in mono.items() if name not in _PERCUSSION_STEMS]
    bpm = estimate_tempo(_to_rate(sum_shortest(mono.values()), sample_rate))
    key = estimate_key(_to_rate(sum_shortest(harmony), sample_rate)) if harmony else None
    return TrackAnalysis(bpm=bpm, key=key)


def analyse_mix(audio: np.ndarray, sample_rate: int) -> TrackAnalysis:
    """Tempo and key of a whole mix (channels x samples, or samples)."""
    mono = _to_rate(_mono(audio[..., window(audio.shape[-1], sample_rate)]), sample_rate)
    return TrackAnalysis(bpm=estimate_tempo(mono), key=estimate_key(mono))


def estimate_tempo(mono: np.ndarray) -> float | None:
    """Beats per minute of mono audio at ANALYSIS_RATE, rounded to 0.1; None for silence
    or no pulse."""
    if not _audible(mono):
        return None
    envelope = librosa.onset.onset_strength(y=mono, sr=ANALYSIS_RATE, hop_length=_HOP, aggregate=np.median)
    if not np.any(envelope > 0):
        return None
    tempo = librosa.feature.tempo(onset_envelope=envelope, sr=ANALYSIS_RATE, hop_length=_HOP)
    bpm = _refined(envelope, float(np.asarray(tempo).ravel()[0]))
    if not math.isfinite(bpm) or not MIN_BPM <= bpm <= MAX_BPM:
        return None
    return round(bpm, 1)


def _refined(envelope: np.ndarray, bpm: float) -> float:
    """`bpm` made precise: librosa's estimate is a whole number of envelope frames per
    beat (at 120 BPM, 21 or 22 frames: 123.0 or 117.5 BPM). The envelope's autocorrelation
    peaks at every multiple of the beat; each of the first few peaks, placed between frames
    by a parabola through its top, gives the beat's length, and their median is taken."""
    if not math.isfinite(bpm) or bpm <= 0:
        return bpm
    centred = envelope - envelope.mean()
    correlation = np.correlate(centred, centred, mode="full")[len(centred) - 1:]
    beat = 60.0 * ANALYSIS_RATE / (_HOP * bpm)
    lengths = []
    for multiple in (1, 2, 3, 4):
        low, high = int(multiple * beat * 0.96), int(math.ceil(multiple * beat * 1.04)) + 1
        if low < 1 or high + 1 >= len(correlation):
            break
        peak = low + int(np.argmax(correlation[low:high]))
        before, top, after = correlation[peak - 1], correlation[peak], correlation[peak + 1]
        curvature = before - 2 * top + after
        if not (top >= before and top >= after and curvature < 0):
            continue  # no peak there, only a slope
        lengths.append((peak + 0.5 * (before - after) / curvature) / multiple)
    if not lengths:
        return bpm
    return 60.0 * ANALYSIS_RATE / (_HOP * float(np.median(lengths)))


def estimate_key(mono: np.ndarray) -> str | None:
    """The key of mono audio at ANALYSIS_RATE ("C major" .. "B minor"); None for silence
    or no pitch."""
    if not _audible(mono):
        return None
    with warnings.catch_warnings():
        # Its tuning estimate warns of too few peaks on sparse sound, then assumes A440.
        warnings.simplefilter("ignore", UserWarning)
        chroma = librosa.feature.chroma_cqt(y=mono, sr=ANALYSIS_RATE, hop_length=_HOP * 4)
    return key_of_chroma(chroma.sum(axis=1))


def key_of_chroma(profile: np.ndarray) -> str | None:
    """The key whose Krumhansl-Kessler profile correlates best with a 12-bin pitch-class
    `profile` (C first); None when the profile is flat."""
    profile = np.asarray(profile, dtype=np.float64)
    if profile.shape != (12,) or not np.all(np.isfinite(profile)) or np.ptp(profile) <= 1e-9 * np.abs(profile).max():
        return None
    scores = [np.corrcoef(profile, np.roll(template, tonic))[0, 1]
              for template in (_MAJOR_PROFILE, _MINOR_PROFILE) for tonic in range(12)]
    return KEY_NAMES[int(np.argmax(scores))]


def warm_up() -> float:
    """Run the analysis once on a few seconds of generated sound, so that numba compiles
    librosa's functions now rather than in a user's job; returns the seconds it took."""
    started = time.monotonic()
    t = np.arange(int(4 * ANALYSIS_RATE)) / ANALYSIS_RATE
    tone = 0.3 * np.sin(2 * np.pi * 220.0 * t) * (np.mod(t, 0.5) < 0.1)
    analyse_stems({"drums": tone, "other": tone}, ANALYSIS_RATE)
    return time.monotonic() - started


def _mono(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=0)
    return np.ascontiguousarray(audio)


def _to_rate(mono: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == ANALYSIS_RATE:
        return mono
    return librosa.resample(mono, orig_sr=sample_rate, target_sr=ANALYSIS_RATE, res_type="soxr_hq")


def _audible(mono: np.ndarray) -> bool:
    return mono.size >= ANALYSIS_RATE and bool(np.all(np.isfinite(mono))) and float(np.abs(mono).max()) >= _SILENCE
