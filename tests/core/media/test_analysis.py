"""core.media.analysis: tempo and key of generated tracks whose answers are known (a few
items of bench/tempo_key_accuracy.py, which measures the hit rates on many more)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.tempo_key_accuracy import RATE, click_track, drum_loop, progression
from core.media.analysis import (
    ANALYSIS_RATE,
    KEY_NAMES,
    WINDOW_S,
    TrackAnalysis,
    analyse_mix,
    analyse_stems,
    key_of_chroma,
    window,
)


def test_a_120_bpm_click_loop_is_120_bpm():
    found = analyse_stems({"drums": click_track(120, seconds=12)}, RATE)
    assert found.bpm == pytest.approx(120, rel=0.01)
    assert found.key is None, "a drums-only track has no key"


@pytest.mark.parametrize(("tonic", "minor", "bpm", "key"), [(0, False, 100, "C major"), (9, True, 128, "A minor")])
def test_a_progression_with_bass_and_drums_gets_its_key_and_tempo(tonic, minor, bpm, key):
    chords, bass = progression(tonic, minor, bpm, "saw", seconds=12)
    stems = {"drums": 0.7 * drum_loop(bpm, seconds=12), "bass": bass, "other": chords}
    found = analyse_stems(stems, RATE)
    assert found.key == key
    assert found.bpm == pytest.approx(bpm, rel=0.04)
    assert found.describe() == f"{bpm} BPM · {key}"
    # The same from the stereo mix, at the analysis' own rate (no resampling).
    mix = np.sum(list(stems.values()), axis=0)[::2]
    assert analyse_mix(np.stack([mix, mix]), ANALYSIS_RATE).key == key


def test_silence_has_neither_tempo_nor_key():
    found = analyse_stems({"drums": np.zeros((2, RATE * 5)), "other": np.zeros((2, RATE * 5))}, RATE)
    assert found == TrackAnalysis(None, None) and found.describe() == "" and found.artifact() == {}
    assert TrackAnalysis(87.6, None).describe() == "88 BPM" and TrackAnalysis(None, "B minor").describe() == "B minor"
    assert analyse_stems({}, RATE) == TrackAnalysis(None, None)


def test_a_long_track_is_analysed_from_a_bounded_window_in_its_middle():
    frames = int(30 * 60 * RATE)
    part = window(frames, RATE)
    assert part.stop - part.start == int(WINDOW_S * RATE)
    assert part.start == (frames - (part.stop - part.start)) // 2
    assert window(RATE * 10, RATE) == slice(0, RATE * 10)


def test_the_key_names_are_the_24_with_sharps():
    assert len(set(KEY_NAMES)) == 24 and KEY_NAMES[0] == "C major" and KEY_NAMES[-1] == "B minor"
    assert "F# major" in KEY_NAMES and not any("b " in name for name in KEY_NAMES)
    # A flat or broken pitch-class profile has no key; C-E-G has C major.
    assert key_of_chroma(np.ones(12)) is None and key_of_chroma(np.full(12, np.nan)) is None
    triad = np.zeros(12)
    triad[[0, 4, 7]] = 1.0
    assert key_of_chroma(triad) == "C major"


def test_the_tempo_and_key_heard_follow_the_rendered_speed_and_transpose():
    song = TrackAnalysis(bpm=100.0, key="A minor")
    assert song.rendered(100, 0) == song
    assert song.rendered(80, 2) == TrackAnalysis(bpm=80.0, key="B minor")
    assert song.rendered(150, -12).describe() == "150 BPM · A minor"
    assert TrackAnalysis(bpm=None, key="B major").rendered(50, 1) == TrackAnalysis(bpm=None, key="C major")
    assert TrackAnalysis(bpm=120.0, key=None).rendered(125, 5).describe() == "150 BPM"
