"""A chain in the model host (`/split clean:`): a vocal model, then a cleaning model on its
vocals, for a whole track and a long one in blocks, on the serial and the batching host."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import numpy as np
import pytest
import soundfile

from core.host.batching_host import BatchingHost
from core.host.protocol import DoneEvent, FailedEvent, HostConfig, JobSpec, ProgressEvent
from core.host.serial_host import SerialHost
from core.host.steps import JobSteps
from tests.support import models as tiny
from tests.support.host_events import CollectedEvents
from tests.support.media import music


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`tiny` (drums, bass, other, vocals) and `halves`, a "cleaning" model whose two stems
    are each half of what it is given (about its mean): the chain's stems must be half the
    tiny model's vocals."""
    folder = tmp_path_factory.mktemp("chain-models")
    tiny.save_th(tiny.tiny_htdemucs(seed=0), folder, "tiny")
    tiny.save_th(tiny.tiny_htdemucs(seed=1, sources=["noreverb", "reverb"], klass=tiny.MixAsEveryStem), folder,
                 "halves")
    return folder


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return music(tmp_path_factory.mktemp("chain-song") / "song.wav", seconds=16.0, tone=330.0)


def run(models, song, out, blocks: bool, batching: bool, **spec) -> tuple[DoneEvent | FailedEvent, list[float]]:
    events = CollectedEvents()
    config = {"block_s": 20.0, "blocks_above_s": 12.0} if blocks else {"block_s": None}
    steps = JobSteps(HostConfig(model="tiny", model_dir=str(models), device="cpu", shifts=0, warm_up=False,
                                log_level=logging.WARNING, **config), events, set(), parent=os.getppid())
    job = JobSpec(job_id=3, input_path=str(song), stems_dir=str(out), model="tiny", format="flac", **spec)
    if batching:
        requests: queue.Queue[JobSpec | None] = queue.Queue()
        serving = threading.Thread(target=BatchingHost(steps, capacity=2).serve, args=(requests,))
        serving.start()
        requests.put(job)
        deadline = time.monotonic() + 120
        while not any(isinstance(e, DoneEvent | FailedEvent) for e in events.items) and time.monotonic() < deadline:
            time.sleep(0.1)
        requests.put(None)  # once the job ended: the host stops when nothing runs
        serving.join(timeout=60)
    else:
        SerialHost(steps).run(job)
    ends = [e for e in events.items if isinstance(e, DoneEvent | FailedEvent)]
    assert len(ends) == 1, events.items
    return ends[0], [e.fraction for e in events.items if isinstance(e, ProgressEvent)]


@pytest.mark.parametrize(("blocks", "batching"), [(False, False), (True, False), (False, True)])
def test_the_cleaning_model_runs_on_the_vocals_of_the_first(models, song, tmp_path, blocks, batching):
    plain, _ = run(models, song, tmp_path / "plain", blocks, batching, stems="vocals")
    chained, progress = run(models, song, tmp_path / "chain", blocks, batching, stems="all", clean_model="halves")
    assert isinstance(plain, DoneEvent) and isinstance(chained, DoneEvent), (plain, chained)
    assert list(chained.result.files) == ["noreverb", "reverb"]
    vocals, _ = soundfile.read(tmp_path / "plain" / "vocals.flac")
    for name in ("noreverb", "reverb"):
        half, _ = soundfile.read(tmp_path / "chain" / f"{name}.flac")
        assert half.shape == vocals.shape
        # demucs's normalisation brings the mean back whole after the model halves the rest.
        expected = (vocals - vocals.mean(axis=0)) / 2
        error = (half - half.mean(axis=0)) - expected
        snr = 10 * np.log10(np.sum(expected ** 2) / np.sum(error ** 2))
        assert snr > 20, (name, snr)  # 16-bit files of a quiet stem; the mix instead of the vocals: < 0
    # The first model's pass is the first half of the job's progress, the cleaning the second.
    assert progress and max(progress) == pytest.approx(1.0) and any(0 < f <= 0.5 for f in progress)
    assert progress.index(max(f for f in progress if f <= 0.5)) < progress.index(max(progress))


def test_a_first_model_without_vocals_fails_the_job_in_words(models, song, tmp_path):
    events = CollectedEvents()
    steps = JobSteps(HostConfig(model="halves", model_dir=str(models), device="cpu", shifts=0, warm_up=False,
                                log_level=logging.WARNING, block_s=None), events, set(), parent=os.getppid())
    SerialHost(steps).run(JobSpec(job_id=4, input_path=str(song), stems_dir=str(tmp_path / "y"), model="halves",
                                  stems="all", format="flac", clean_model="tiny"))
    failed = events.items[-1]
    assert isinstance(failed, FailedEvent) and "unknown stem 'vocals'" in failed.reason, failed
