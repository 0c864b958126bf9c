"""The model host's finish step finds a track's tempo and key in its stems and reports
them with the results, for a whole track and for a long one separated in blocks."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import soundfile

from bench.tempo_key_accuracy import RATE, drum_loop, progression
from core.host.protocol import DoneEvent, HostConfig, JobSpec
from core.host.serial_host import SerialHost
from core.host.steps import JobSteps
from core.jobs.results import checked_analysis
from tests.support.host_events import CollectedEvents


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    """16 s in C major at 120 BPM: drums, bass and chords, stereo."""
    chords, bass = progression(0, False, 120, "organ", seconds=16)
    mix = chords + bass + 0.7 * drum_loop(120, seconds=16)
    path = tmp_path_factory.mktemp("song") / "song.wav"
    soundfile.write(path, np.stack([mix, mix], axis=1), RATE)
    return path


@pytest.mark.parametrize("blocks", [False, True])
def test_the_host_reports_the_tempo_and_key_of_the_stems(model_dir, song, tmp_path, blocks):
    events = CollectedEvents()
    config = {"block_s": 20.0, "blocks_above_s": 12.0} if blocks else {"block_s": None}
    host = SerialHost(JobSteps(HostConfig(model="mixstems", model_dir=str(model_dir), device="cpu", shifts=0,
                                          warm_up=False, log_level=logging.WARNING, **config),
                               events, set(), parent=os.getppid()))
    host.run(JobSpec(job_id=7, input_path=str(song), stems_dir=str(tmp_path / "stems"), model="mixstems",
                     stems="all", format="flac"))
    done = events.items[-1]
    assert isinstance(done, DoneEvent), done
    artifacts = done.result.artifacts()
    assert artifacts["analysis"]["key"] == "C major"
    assert artifacts["analysis"]["bpm"] == pytest.approx(120, rel=0.02)
    assert checked_analysis(artifacts) is not None
