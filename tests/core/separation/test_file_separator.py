"""core.separation.file_separator: batches, both scheduling modes, staging and clean failure."""

from __future__ import annotations

import numpy as np
import pytest

from core.media.audio import Limits, OutputFormat, decode
from core.media.stem_files import write_track
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.file_separator import FileSeparator, FileSeparatorEvents
from core.separation.stems import parse_stems
from tests.support.media import music


@pytest.fixture(scope="module")
def engine(model_dir):
    return SeparationEngine.load("tiny", model_dir, "cpu")


class Recorder(FileSeparatorEvents):
    def __init__(self):
        self.events = []

    def track_started(self, index, result):
        self.events.append(("start", index))

    def track_finished(self, index, result):
        self.events.append(("end", index, result.ok))


@pytest.mark.parametrize("overlap_io", [False, True], ids=["in-turn", "overlapped"])
def test_batch_writes_every_track_and_reports_each(tmp_path, engine, overlap_io):
    inputs = [music(tmp_path / "in" / f"t{k}.wav", seconds=3.0, tone=300 + 100 * k) for k in range(3)]
    broken = tmp_path / "in" / "broken.mp3"
    broken.write_bytes(b"\x00" * 2000)
    recorder = Recorder()
    batch = FileSeparator(engine, parse_stems("karaoke", engine.sources), OutputFormat("wav", wav_depth="float"),
                           SeparationOptions(shifts=0), overlap_io=overlap_io)
    results = batch.run([inputs[0], broken, *inputs[1:]], tmp_path / "out", recorder)
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].error and "Traceback" not in results[1].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t0", "t1", "t2"]
    assert sorted(e[1] for e in recorder.events if e[0] == "end") == [0, 1, 2, 3]
    # Each track's result equals a separation of that track alone.
    alone = engine.separate(decode(inputs[2], 44100, 2), parse_stems("karaoke", engine.sources),
                            SeparationOptions(shifts=0))
    written = decode(tmp_path / "out" / "t2" / "vocals.wav", 44100, 2, Limits(min_duration_s=0))
    np.testing.assert_allclose(written, alone["vocals"], atol=1e-6)


def test_write_track_replaces_an_older_result_and_leaves_no_staging(tmp_path):
    stems = {"vocals": np.zeros((2, 44100), np.float32)}
    write_track(stems, 44100, tmp_path, "song", OutputFormat("flac"))
    (tmp_path / "song" / "stale.flac").write_bytes(b"old")
    write_track(stems, 44100, tmp_path, "song", OutputFormat("flac"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song"]
    assert sorted(p.name for p in (tmp_path / "song").iterdir()) == ["vocals.flac"]


def test_write_track_failure_leaves_nothing(tmp_path):
    bad = {"vocals": np.zeros((2, 44100), np.float32)}
    with pytest.raises(ValueError):
        write_track(bad, 44100, tmp_path, "song", OutputFormat("aiff"))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_loud_stems_share_one_gain(tmp_path):
    loud = np.full((2, 44100), 1.5, np.float32)
    soft = np.full((2, 44100), 0.5, np.float32)
    folder = write_track({"a": loud, "b": soft}, 44100, tmp_path, "x", OutputFormat("wav", wav_depth="float"))
    a = decode(folder / "a.wav", 44100, 2, Limits(min_duration_s=0))
    b = decode(folder / "b.wav", 44100, 2, Limits(min_duration_s=0))
    assert float(np.abs(a).max()) < 1.0
    np.testing.assert_allclose(a / b, 3.0, rtol=1e-5)
