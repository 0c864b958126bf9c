"""Benchmark: how often core.media.analysis finds the right tempo and key, on generated
material whose answers are known.

Material (generated here, at 44.1 kHz, as stems the way a model host has them):

- click tracks (an accented click per beat) and drum loops (kick, snare, eighth-note
  hi-hats) at 60-180 BPM;
- chord progressions in all 24 keys: I-IV-V-I in major, i-iv-V-i in minor (harmonic
  minor's major V), one chord a bar, with a bass line on the roots and a drum loop, in
  several timbres (sine, sawtooth, organ, plucked).

Each item is analysed three ways: as stems, as the model host does (`analyse_stems`: tempo
from all of them, key from everything but the drums); as the mix of them all
(`analyse_mix`); and, for the tempo only, from the drums and bass stems alone. Scores:

- tempo: a hit within 4% of the true BPM; an octave error within 4% of half, double,
  a third or three times it (counted apart); anything else a miss;
- key: exact; else the relative key (C major / A minor), a fifth away (same mode), the
  parallel key (C major / C minor), or a miss.

    python bench/tempo_key_accuracy.py              # every item (a few minutes on one core)
    python bench/tempo_key_accuracy.py --quick      # a sample
    python bench/tempo_key_accuracy.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.media.analysis import KEY_NAMES, PITCH_CLASSES, TrackAnalysis, analyse_mix, analyse_stems

RATE = 44100
TEMPOS = (60, 70, 80, 90, 100, 110, 120, 128, 140, 150, 160, 170, 180)
TIMBRES = ("sine", "saw", "organ", "pluck")
TEMPO_TOLERANCE = 0.04
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
HARMONIC_MINOR_SCALE = (0, 2, 3, 5, 7, 8, 11)


@dataclass
class Item:
    """One piece of generated music and its known answers."""

    name: str
    stems: dict[str, np.ndarray]  # mono, RATE
    bpm: float | None = None
    key: str | None = None
    tags: list[str] = field(default_factory=list)

    def mix(self) -> np.ndarray:
        return np.sum(list(self.stems.values()), axis=0)


# -- generators -------------------------------------------------------------------------------


def _envelope(length: int, decay_s: float) -> np.ndarray:
    return np.exp(-np.arange(length) / (decay_s * RATE))


def _place(track: np.ndarray, sound: np.ndarray, at_s: float) -> None:
    start = int(round(at_s * RATE))
    if start >= len(track):
        return
    end = min(len(track), start + len(sound))
    track[start:end] += sound[:end - start]


def click_track(bpm: float, seconds: float = 20.0) -> np.ndarray:
    """A metronome: a 1.5 kHz click on every beat, 2 kHz and louder on each bar's first."""
    track = np.zeros(int(seconds * RATE))
    length = int(0.03 * RATE)
    t = np.arange(length) / RATE
    beat = 60.0 / bpm
    for index in range(int(seconds / beat) + 1):
        accent = index % 4 == 0
        click = (0.8 if accent else 0.5) * np.sin(2 * np.pi * (2000 if accent else 1500) * t)
        _place(track, click * _envelope(length, 0.006), index * beat)
    return track.astype(np.float32)


def drum_loop(bpm: float, seconds: float = 20.0, seed: int = 0) -> np.ndarray:
    """Kick on beats 1 and 3, snare on 2 and 4, closed hi-hat on every eighth note."""
    rng = np.random.default_rng(seed)
    track = np.zeros(int(seconds * RATE))
    beat = 60.0 / bpm
    kick_len = int(0.25 * RATE)
    t = np.arange(kick_len) / RATE
    sweep = 50 + 70 * np.exp(-t / 0.03)  # a kick's pitch falls from 120 to 50 Hz
    kick = 0.9 * np.sin(2 * np.pi * np.cumsum(sweep) / RATE) * _envelope(kick_len, 0.08)
    snare_len = int(0.18 * RATE)
    ts = np.arange(snare_len) / RATE
    snare = (0.5 * rng.standard_normal(snare_len) + 0.4 * np.sin(2 * np.pi * 190 * ts)) * _envelope(snare_len, 0.05)
    hat_len = int(0.05 * RATE)
    hat = np.diff(rng.standard_normal(hat_len + 1)) * 0.15 * _envelope(hat_len, 0.012)
    for index in range(int(seconds / beat) + 1):
        at = index * beat
        _place(track, kick if index % 2 == 0 else snare, at)
        _place(track, hat, at)
        _place(track, 0.6 * hat, at + beat / 2)
    return track.astype(np.float32)


def _tone(frequency: float, length: int, timbre: str) -> np.ndarray:
    t = np.arange(length) / RATE
    if timbre == "sine":
        partials = [(1, 1.0)]
    elif timbre == "saw":
        partials = [(n, 1.0 / n) for n in range(1, 12)]
    elif timbre == "organ":
        partials = [(1, 1.0), (2, 0.5), (3, 0.35), (4, 0.25), (6, 0.15), (8, 0.1)]
    elif timbre == "pluck":
        partials = [(n, 0.9 ** n / n) for n in range(1, 9)]
    else:
        raise ValueError(timbre)
    tone = sum(weight * np.sin(2 * np.pi * frequency * n * t) for n, weight in partials if frequency * n < RATE / 2)
    tone = np.asarray(tone, dtype=np.float64)
    if timbre == "pluck":
        tone = tone * _envelope(length, 0.6)
    fade = min(length // 2, int(0.01 * RATE))
    ramp = np.linspace(0.0, 1.0, fade)
    tone[:fade] *= ramp
    tone[length - fade:] *= ramp[::-1]
    return tone


def _midi_hz(note: int) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def progression(tonic: int, minor: bool, bpm: float, timbre: str,
                seconds: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """I-IV-V-I (major) or i-iv-V-i (minor) in the key of pitch class `tonic`, one chord a
    bar, repeated; returns (chords, bass)."""
    scale = HARMONIC_MINOR_SCALE if minor else MAJOR_SCALE
    bar = 4 * 60.0 / bpm
    length = int(bar * RATE)
    chords = np.zeros(int(seconds * RATE))
    bass = np.zeros_like(chords)
    root_note = 48 + tonic  # C3 .. B3
    for index in range(int(seconds / bar) + 1):
        degree = (0, 3, 4, 0)[index % 4]
        notes = [root_note + 12 * ((degree + step) // 7) + scale[(degree + step) % 7] for step in (0, 2, 4)]
        chord = sum(_tone(_midi_hz(note), length, timbre) for note in notes) / 3
        _place(chords, 0.4 * np.asarray(chord), index * bar)
        _place(bass, 0.4 * _tone(_midi_hz(notes[0] - 12), length, "pluck"), index * bar)
    return chords.astype(np.float32), bass.astype(np.float32)


def key_name(tonic: int, minor: bool) -> str:
    return f"{PITCH_CLASSES[tonic]} {'minor' if minor else 'major'}"


def items(quick: bool = False) -> Iterator[Item]:
    tempos = TEMPOS[::3] if quick else TEMPOS
    for bpm in tempos:
        yield Item(f"click {bpm}", {"drums": click_track(bpm)}, bpm=bpm, tags=["click"])
        yield Item(f"drums {bpm}", {"drums": drum_loop(bpm, seed=bpm)}, bpm=bpm, tags=["drums"])
    timbres = TIMBRES[:2] if quick else TIMBRES
    tonics = range(0, 12, 5) if quick else range(12)
    for index, (timbre, tonic, minor) in enumerate(
            (timbre, tonic, minor) for timbre in timbres for tonic in tonics for minor in (False, True)):
        bpm = TEMPOS[(index * 5) % len(TEMPOS)]
        chords, bass = progression(tonic, minor, bpm, timbre)
        stems = {"drums": 0.7 * drum_loop(bpm, seed=index), "bass": bass, "other": chords}
        yield Item(f"{key_name(tonic, minor)} {timbre} {bpm}", stems, bpm=bpm, key=key_name(tonic, minor),
                   tags=["progression", timbre])


# -- scoring ----------------------------------------------------------------------------------


def tempo_verdict(found: float | None, true: float) -> str:
    if found is None:
        return "none"
    for label, factor in (("hit", 1.0), ("octave", 2.0), ("octave", 0.5), ("third", 3.0), ("third", 1 / 3)):
        if abs(found - true * factor) <= TEMPO_TOLERANCE * true * factor:
            return label
    return "miss"


def key_verdict(found: str | None, true: str) -> str:
    if found is None:
        return "none"
    if found == true:
        return "exact"
    tonic, mode = PITCH_CLASSES.index(true.split()[0]), true.split()[1]
    got_tonic, got_mode = PITCH_CLASSES.index(found.split()[0]), found.split()[1]
    if got_mode != mode:
        # The relative key shares the notes: A minor for C major, C major for A minor.
        relative = (tonic + (9 if mode == "major" else 3)) % 12
        if got_tonic == relative:
            return "relative"
        if got_tonic == tonic:
            return "parallel"
        return "miss"
    if (got_tonic - tonic) % 12 in (5, 7):
        return "fifth"
    return "miss"


def evaluate(all_items: list[Item]) -> dict:
    report: dict = {"modes": {}}
    for mode in ("stems", "mix", "drums+bass tempo"):
        tempo_scores: Counter[str] = Counter()
        key_scores: Counter[str] = Counter()
        by_kind: dict[str, Counter[str]] = {}
        misses = []
        seconds = 0.0
        for item in all_items:
            started = time.monotonic()
            if mode == "stems":
                found = analyse_stems(item.stems, RATE)
            elif mode == "mix":
                found = analyse_mix(item.mix(), RATE)
            else:
                rhythm = {name: audio for name, audio in item.stems.items() if name in ("drums", "bass")}
                found = TrackAnalysis(analyse_stems(rhythm, RATE).bpm, None)
            seconds += time.monotonic() - started
            verdicts = _score(item, found)
            if "tempo" in verdicts:
                tempo_scores[verdicts["tempo"]] += 1
                by_kind.setdefault(item.tags[0], Counter())[verdicts["tempo"]] += 1
            if "key" in verdicts and mode != "drums+bass tempo":
                key_scores[verdicts["key"]] += 1
                by_kind.setdefault("key " + item.tags[-1], Counter())[verdicts["key"]] += 1
            if mode == "drums+bass tempo":
                verdicts.pop("key", None)
            if verdicts.get("tempo", "hit") != "hit" or verdicts.get("key", "exact") != "exact":
                misses.append(f"{item.name}: {found.bpm} BPM ({verdicts.get('tempo', '-')}), "
                              f"{found.key} ({verdicts.get('key', '-')})")
        report["modes"][mode] = {
            "tempo": dict(tempo_scores), "key": dict(key_scores),
            "tempo_hit_rate": tempo_scores["hit"] / max(1, sum(tempo_scores.values())),
            "key_hit_rate": key_scores["exact"] / max(1, sum(key_scores.values())),
            "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
            "misses": misses,
            "seconds_per_item": seconds / max(1, len(all_items)),
        }
    return report


def _score(item: Item, found: TrackAnalysis) -> dict[str, str]:
    verdicts = {}
    if item.bpm is not None:
        verdicts["tempo"] = tempo_verdict(found.bpm, item.bpm)
    if item.key is not None:
        verdicts["key"] = key_verdict(found.key, item.key)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a sample of the items")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    assert len(KEY_NAMES) == 24
    all_items = list(items(args.quick))
    print(f"{len(all_items)} items")
    report = evaluate(all_items)
    for mode, result in report["modes"].items():
        tempo, key = result["tempo"], result["key"]
        print(f"\n== {mode} ({result['seconds_per_item']:.2f} s per item)")
        print(f"tempo: {tempo.get('hit', 0)}/{sum(tempo.values())} within 4% ({100 * result['tempo_hit_rate']:.0f}%); "
              f"octave errors {tempo.get('octave', 0)}, thirds {tempo.get('third', 0)}, "
              f"misses {tempo.get('miss', 0)}, none {tempo.get('none', 0)}")
        print(f"key:   {key.get('exact', 0)}/{sum(key.values())} exact ({100 * result['key_hit_rate']:.0f}%); "
              f"relative {key.get('relative', 0)}, fifth {key.get('fifth', 0)}, parallel {key.get('parallel', 0)}, "
              f"misses {key.get('miss', 0)}, none {key.get('none', 0)}")
        for kind, counts in result["by_kind"].items():
            print(f"  {kind}: {dict(counts)}")
        for miss in result["misses"]:
            print(f"  - {miss}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
