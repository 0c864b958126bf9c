"""core.separation.file_separator: batches, both scheduling modes, staging and clean failure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from core.media.audio import Limits, OutputFormat, decode
from core.media.stem_files import MARKER, FolderNotOursError, write_track
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
    assert sorted(p.name for p in (tmp_path / "song").iterdir()) == [MARKER, "vocals.flac"]


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


# -- never a file stembot did not write ------------------------------------------------------


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _karaoke(engine, **kwargs):
    return FileSeparator(engine, parse_stems("karaoke", engine.sources), OutputFormat("flac"),
                         SeparationOptions(shifts=0), **kwargs)


@pytest.mark.parametrize("block_s", [None, 16.0], ids=["whole-track", "blockwise"])
def test_a_users_folder_keeps_its_files_and_gains_the_stems(tmp_path, engine, block_s):
    # `stembot separate https://x/Documents.mp3 --out ~` once replaced ~/Documents whole.
    song = music(tmp_path / "in" / "Documents.wav", seconds=3.0)
    out = tmp_path / "home"
    mine = out / "Documents"
    (mine / "taxes").mkdir(parents=True)
    (mine / "Documents.wav").write_bytes(song.read_bytes())
    (mine / "taxes" / "2024.pdf").write_bytes(b"%PDF precious")
    before = _snapshot(mine)
    results = _karaoke(engine, block_s=block_s, blocks_above_s=0.0).run([song], out)
    assert [r.error for r in results] == [None]
    assert results[0].folder == mine
    after = _snapshot(mine)
    assert {name: after[name] for name in before} == before
    assert sorted(map(str, after.keys() - before.keys())) == ["no_vocals.flac", "vocals.flac"]
    assert sorted(p.name for p in out.iterdir()) == ["Documents"]  # no staging, no marker made the folder ours


@pytest.mark.parametrize("block_s", [None, 16.0], ids=["whole-track", "blockwise"])
def test_a_stem_name_taken_in_a_users_folder_is_refused_and_changes_nothing(tmp_path, engine, block_s):
    songs = [music(tmp_path / "in" / f"{name}.wav", seconds=3.0) for name in ("mine", "other")]
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "vocals.flac").write_bytes(b"my own recording")
    (out / "mine" / "notes.txt").write_bytes(b"keep")
    results = _karaoke(engine, block_s=block_s, blocks_above_s=0.0).run(songs, out)
    assert results[0].error == f"{out / 'mine'} exists and was not made by stembot; choose another --out"
    assert results[1].ok  # the other inputs still run
    assert _snapshot(out / "mine") == {Path("vocals.flac"): b"my own recording", Path("notes.txt"): b"keep"}
    assert sorted(p.name for p in out.iterdir()) == ["mine", "other"]


def test_a_file_named_like_the_output_folder_is_refused_and_kept(tmp_path):
    (tmp_path / "song").write_bytes(b"not a folder")
    with pytest.raises(FolderNotOursError, match="exists and was not made by stembot"):
        write_track({"vocals": np.zeros((2, 44100), np.float32)}, 44100, tmp_path, "song", OutputFormat("flac"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song"]
    assert (tmp_path / "song").read_bytes() == b"not a folder"


def test_a_second_run_replaces_stembots_own_folder(tmp_path, engine):
    song = music(tmp_path / "in" / "song.wav", seconds=3.0)
    first = _karaoke(engine).run([song], tmp_path / "out")[0]
    (first.folder / "vocals.flac").write_bytes(b"stale")
    second = _karaoke(engine).run([song], tmp_path / "out")[0]
    assert second.ok and second.folder == first.folder
    assert sorted(p.name for p in second.folder.iterdir()) == [MARKER, "no_vocals.flac", "vocals.flac"]
    assert (second.folder / "vocals.flac").read_bytes() != b"stale"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["song"]


def test_stems_that_fail_half_way_into_a_users_folder_are_taken_out_again(tmp_path, monkeypatch):
    mine = tmp_path / "song"
    mine.mkdir()
    (mine / "notes.txt").write_bytes(b"keep")
    real_link = os.link

    def link(source, target):
        if Path(target).name == "vocals.flac":
            raise FileExistsError(target)  # someone wrote it between the check and the move
        real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    stems = {"bass": np.zeros((2, 44100), np.float32), "vocals": np.zeros((2, 44100), np.float32)}
    with pytest.raises(FolderNotOursError):
        write_track(stems, 44100, tmp_path, "song", OutputFormat("flac"))
    assert _snapshot(mine) == {Path("notes.txt"): b"keep"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song"]
