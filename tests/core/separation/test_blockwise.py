"""core.separation.blockwise: long tracks decoded, separated and encoded in blocks, with real ffmpeg
and demucs's own code on a tiny model. The model's segments are short (2 s, `tinyshort`) so
that blocks can be short too (8 s): a 30-second track has several boundaries."""

from __future__ import annotations

import itertools
import logging
import os
import types
from pathlib import Path

import numpy as np
import pytest

from core.errors import CorruptMediaError, EncodeError, JobCancelled
from core.host.protocol import CancelledEvent, DoneEvent, HostConfig, HostEvent, JobSpec, ProgressEvent, StageEvent
from core.host.serial_host import SerialHost
from core.host.steps import JobSteps
from core.media.audio import Limits, OutputFormat, decode
from core.media.render import RenderOptions
from core.media.stem_files import MARKER, FolderNotOursError, write_track
from core.separation import blockwise
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import parse_stems
from tests.support.media import music, snr_db

pytestmark = pytest.mark.slow

RATE = 44100
MODEL = "tinyshort"
BLOCK_S = 8.0
TRACK_S = 30.0
FLOAT_WAV = OutputFormat(name="wav", wav_depth="float")
EXACT = SeparationOptions(shifts=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    return SeparationEngine.load(MODEL, model_dir, "cpu")


@pytest.fixture(scope="module")
def track(tmp_path_factory) -> Path:
    return music(tmp_path_factory.mktemp("media") / "long.wav", seconds=TRACK_S, tone=330.0)


@pytest.fixture(scope="module")
def both(engine, track, tmp_path_factory):
    """The same track through the whole-track path and through blocks (shifts=0)."""
    request = parse_stems("all", engine.sources)
    mix = decode(track, RATE, 2, Limits())
    whole = engine.separate(mix, request, EXACT)
    work = tmp_path_factory.mktemp("work")
    staged = blockwise.stage_input(track, engine, Limits(), work)
    fractions: list[float] = []
    stems = blockwise.separate_staged(staged, engine, request, EXACT, work, progress=fractions.append,
                                      block_s=BLOCK_S)
    blocks = {name: _read(path, 2) for name, path in stems.paths.items()}
    stride, context = blockwise.model_grid(engine, request, EXACT)
    plan = blockwise.plan_blocks(staged.frames, int(BLOCK_S * RATE), context, 2 * (RATE // 2), stride)
    return types.SimpleNamespace(mix=mix, whole=whole, blocks=blocks, staged=staged, stems=stems,
                                 fractions=fractions, plan=plan)


def _read(path: Path, channels: int) -> np.ndarray:
    return np.fromfile(path, dtype="<f4").reshape(-1, channels).T


def _no_leftovers(folder: Path) -> list[str]:
    """Hidden staging or work files; stembot's marker is meant to stay."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != MARKER)


# -- the plan -------------------------------------------------------------------------------


def test_blocks_start_on_the_segment_grid_and_keep_everything_once():
    stride, context, crossfade = 1000, 2500, 200
    frames = 100_003
    plan = blockwise.plan_blocks(frames, 20_000, context, crossfade, stride)
    assert len(plan) == 6
    assert plan[0].start == plan[0].keep_from == 0 and plan[-1].stop == plan[-1].keep_to == frames
    for before, after in itertools.pairwise(plan):
        assert after.start % stride == 0
        assert after.keep_from - after.start >= context          # context before what is kept
        assert before.stop - before.keep_to >= context           # and after it
        assert before.keep_to - after.keep_from == crossfade     # neighbours share the cross-fade only
    assert blockwise.plan_blocks(15_000, 20_000, context, crossfade, stride) == [blockwise.Block(0, 15_000, 0, 15_000)]
    with pytest.raises(ValueError):
        blockwise.plan_blocks(frames, 2_000, context, crossfade, stride)


def test_only_long_or_unmeasured_tracks_use_blocks():
    assert not blockwise.use_blocks(180.0)
    assert not blockwise.use_blocks(blockwise.BLOCKS_ABOVE_S)
    assert blockwise.use_blocks(blockwise.BLOCKS_ABOVE_S + 1)
    assert blockwise.use_blocks(None)
    assert not blockwise.use_blocks(3600.0, block_s=None)


# -- the result -----------------------------------------------------------------------------


def test_blocks_equal_the_whole_track_overall_and_at_every_boundary(both):
    assert len(both.plan) >= 4  # several boundaries
    window = RATE  # 1 s on each side of every boundary: the cross-fade and its surroundings
    edges = sorted({b.keep_from for b in both.plan[1:]} | {b.keep_to for b in both.plan[:-1]})
    for name, reference in both.whole.items():
        estimate = both.blocks[name]
        assert estimate.shape == reference.shape
        assert snr_db(reference, estimate) > 40, name
        for edge in edges:
            part = slice(edge - window, edge + window)
            assert snr_db(reference[:, part], estimate[:, part]) > 40, (name, edge)
    # The stats the blocks were normalised by are the whole track's.
    mono = both.mix.mean(0)
    assert both.staged.mean == pytest.approx(float(mono.mean()), abs=1e-6)
    assert both.staged.std == pytest.approx(float(mono.std(ddof=1)), rel=1e-5)


def test_staged_input_is_the_decoded_track(both):
    assert both.staged.frames == both.mix.shape[1]
    np.testing.assert_array_equal(both.staged.load(), both.mix)
    np.testing.assert_array_equal(both.staged.read(1000, 5000), both.mix[:, 1000:5000])


def test_progress_rises_over_the_whole_track_to_one(both):
    fractions = both.fractions
    assert len(fractions) > 2 * len(both.plan)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(f < 1.0 for f in fractions[:-1])
    # Spread over the track, not 0 -> 1 within the first block.
    assert min(f for f in fractions if f > 0.3) < 0.6


def test_peak_is_the_largest_sample_of_all_stems(both):
    assert both.stems.peak == max(float(np.abs(a).max()) for a in both.blocks.values())


def test_stems_sum_to_the_mix_with_one_shared_gain_as_the_whole_track(model_dir, tmp_path):
    # A bag of specialists: `no_vocals` is the mix minus the vocals, so the two stems sum
    # to the mix exactly, and a loud mix needs the anti-clip gain.
    bag = SeparationEngine.load("tinyshortbag", model_dir, "cpu")
    source = music(tmp_path / "loud.wav", seconds=20.0, volume=12.0, extra=("-c:a", "pcm_f32le"))
    request = parse_stems("karaoke", bag.sources)
    mix = decode(source, RATE, 2, Limits())
    assert np.abs(mix).max() > 1.2
    whole = write_track(bag.separate(mix, request, EXACT), RATE, tmp_path, "whole", FLOAT_WAV)
    blocks = blockwise.separate_file(source, bag, request, EXACT, Limits(), tmp_path, "blocks", FLOAT_WAV,
                                     block_s=BLOCK_S)
    assert _no_leftovers(tmp_path) == []
    gains = {}
    for folder in (whole, blocks):
        vocals, rest = (decode(folder / f"{n}.wav", RATE, 2, Limits()) for n in ("vocals", "no_vocals"))
        total = vocals + rest
        gains[folder.name] = float(np.sum(total * mix) / np.sum(mix * mix))
        assert snr_db(gains[folder.name] * mix, total) > 60
    assert gains["whole"] < 0.9
    assert gains["blocks"] == pytest.approx(gains["whole"], rel=1e-5)
    for name in ("vocals", "no_vocals"):
        assert snr_db(decode(whole / f"{name}.wav", RATE, 2, Limits()),
                      decode(blocks / f"{name}.wav", RATE, 2, Limits())) > 40


# -- cancel, failure, clean-up --------------------------------------------------------------


@pytest.fixture(scope="module")
def short_track(tmp_path_factory) -> Path:
    return music(tmp_path_factory.mktemp("short") / "twenty.wav", seconds=20.0)


def _counting(engine, monkeypatch, fail_at: int | None = None) -> list[str]:
    """Record each `engine.separate` call ("started", "finished"); raise at call `fail_at`."""
    calls: list[str] = []
    original = engine.separate

    def separate(*args, **kwargs):
        calls.append("started")
        if fail_at is not None and calls.count("started") == fail_at:
            raise RuntimeError("the model broke")
        result = original(*args, **kwargs)
        calls.append("finished")
        return result

    monkeypatch.setattr(engine, "separate", separate)
    return calls


def test_cancel_between_blocks_stops_before_the_next_block_and_cleans_up(engine, short_track, tmp_path,
                                                                         monkeypatch):
    calls = _counting(engine, monkeypatch)
    request = parse_stems("all", engine.sources)
    with pytest.raises(JobCancelled):
        blockwise.separate_file(short_track, engine, request, EXACT, Limits(), tmp_path, "out", FLOAT_WAV,
                                should_cancel=lambda: "finished" in calls, block_s=BLOCK_S)
    # Checked between blocks: the second never started (inside it, the engine's own
    # check would have stopped it only after it began).
    assert calls == ["started", "finished"]
    assert list(tmp_path.iterdir()) == []


def test_cancel_within_a_block_cleans_up(engine, short_track, tmp_path):
    seen: list[float] = []
    request = parse_stems("all", engine.sources)
    with pytest.raises(JobCancelled):
        blockwise.separate_file(short_track, engine, request, EXACT, Limits(), tmp_path, "out", FLOAT_WAV,
                                progress=seen.append, should_cancel=lambda: bool(seen), block_s=BLOCK_S)
    assert len(seen) == 1 and seen[0] < 0.5
    assert list(tmp_path.iterdir()) == []


def test_a_failure_in_a_later_block_leaves_nothing_behind(engine, short_track, tmp_path, monkeypatch):
    calls = _counting(engine, monkeypatch, fail_at=2)
    request = parse_stems("all", engine.sources)
    with pytest.raises(RuntimeError, match="the model broke"):
        blockwise.separate_file(short_track, engine, request, EXACT, Limits(), tmp_path, "out", FLOAT_WAV,
                                block_s=BLOCK_S)
    assert calls == ["started", "finished", "started"]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_encode_or_decode_leaves_nothing_behind(engine, short_track, tmp_path, monkeypatch):
    request = parse_stems("all", engine.sources)
    broken = tmp_path / "in" / "broken.mp3"
    broken.parent.mkdir()
    broken.write_bytes(b"\xff\xfb" + bytes(range(256)) * 400)
    out = tmp_path / "out"
    with pytest.raises(CorruptMediaError):
        blockwise.separate_file(broken, engine, request, EXACT, Limits(), out, "x", FLOAT_WAV, block_s=BLOCK_S)
    assert list(out.iterdir()) == []

    def fail(*args, **kwargs):
        raise EncodeError("disk full")

    # The name blockwise encodes with (a disk that fills up half-way through the stems).
    monkeypatch.setattr(blockwise, "encode_stream", fail)
    with pytest.raises(EncodeError):
        blockwise.separate_file(short_track, engine, request, EXACT, Limits(), out, "x", FLOAT_WAV,
                                block_s=BLOCK_S)
    assert list(out.iterdir()) == []


def test_a_successful_run_leaves_only_the_stems(engine, short_track, tmp_path):
    request = parse_stems("karaoke", engine.sources)
    folder = blockwise.separate_file(short_track, engine, request, EXACT, Limits(), tmp_path, "song",
                                     OutputFormat(name="flac"), block_s=BLOCK_S)
    assert [p.name for p in tmp_path.iterdir()] == ["song"]
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "no_vocals.flac", "vocals.flac"]
    audio = decode(folder / "vocals.flac", RATE, 2, Limits())
    assert audio.shape[1] == decode(short_track, RATE, 2, Limits()).shape[1]


def _staged(work: Path, names: list[str]) -> blockwise.StagedStems:
    work.mkdir()
    paths = {name: work / f"{name}.f32" for name in names}
    for path in paths.values():
        np.zeros((RATE, 2), "<f4").tofile(path)
    return blockwise.StagedStems(paths=paths, frames=RATE, channels=2, sample_rate=RATE, peak=0.0)


def test_staged_stems_join_a_users_folder_and_never_replace_its_files(tmp_path):
    mine = tmp_path / "out" / "song"
    mine.mkdir(parents=True)
    (mine / "song.flac").write_bytes(b"the original")
    folder = blockwise.write_staged(_staged(tmp_path / "a", ["vocals"]), tmp_path / "out", "song", FLOAT_WAV)
    assert folder == mine
    assert sorted(p.name for p in mine.iterdir()) == ["song.flac", "vocals.wav"]
    assert (mine / "song.flac").read_bytes() == b"the original"
    # Again: vocals.wav is taken now, and the folder is not stembot's to replace.
    with pytest.raises(FolderNotOursError, match="exists and was not made by stembot; choose another --out"):
        blockwise.write_staged(_staged(tmp_path / "b", ["bass", "vocals"]), tmp_path / "out", "song", FLOAT_WAV)
    assert sorted(p.name for p in mine.iterdir()) == ["song.flac", "vocals.wav"]
    assert (mine / "song.flac").read_bytes() == b"the original"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["song"]


# -- through `stembot separate` ----------------------------------------------------------


def test_the_batch_separator_gives_the_same_files_with_blocks(engine, track, tmp_path):
    from core.separation.file_separator import FileSeparator, FileSeparatorEvents

    class Events(FileSeparatorEvents):
        def __init__(self):
            self.fractions: dict[int, list[float]] = {}

        def track_progress(self, index: int, fraction: float) -> None:
            self.fractions.setdefault(index, []).append(fraction)

    request = parse_stems("all", engine.sources)
    outputs = {}
    for label, block_s in (("whole", None), ("blocks", BLOCK_S)):
        events = Events()
        separator = FileSeparator(engine, request, OutputFormat(name="flac"), EXACT, block_s=block_s,
                                   blocks_above_s=20.0)
        results = separator.run([track], tmp_path / label, events)
        assert [r.error for r in results] == [None]
        assert results[0].audio_s == pytest.approx(30.0, abs=0.01)
        assert events.fractions[0][-1] == 1.0 and events.fractions[0] == sorted(events.fractions[0])
        assert _no_leftovers(tmp_path / label) == []
        outputs[label] = [r.folder for r in results]
    for whole, blocks in zip(outputs["whole"], outputs["blocks"], strict=True):
        for name in engine.sources:
            reference = decode(whole / f"{name}.flac", RATE, 2, Limits())
            estimate = decode(blocks / f"{name}.flac", RATE, 2, Limits())
            assert reference.shape == estimate.shape and snr_db(reference, estimate) > 40


# -- through the model host -----------------------------------------------------------------


class _Events:
    def __init__(self):
        self.items: list[HostEvent] = []

    def put(self, item: HostEvent) -> None:
        self.items.append(item)


def _host_run(model_dir, source: Path, out: Path, render: str = "", **config) -> tuple[DoneEvent, list[HostEvent]]:
    events = _Events()
    host = SerialHost(JobSteps(HostConfig(model=MODEL, model_dir=str(model_dir), device="cpu", shifts=0,
                                          warm_up=False, log_level=logging.WARNING, **config),
                               events, set(), parent=os.getppid()))
    spec = JobSpec(job_id=7, input_path=str(source), stems_dir=str(out / "stems"), model=MODEL, stems="all",
                   format="flac", render=render)
    host.run(spec)
    done = events.items[-1]
    assert isinstance(done, DoneEvent), done
    return done, events.items


def test_the_model_host_gives_the_same_files_with_blocks(model_dir, track, tmp_path):
    whole_done, _ = _host_run(model_dir, track, tmp_path / "whole", block_s=None)
    blocks_done, events = _host_run(model_dir, track, tmp_path / "blocks", block_s=BLOCK_S, blocks_above_s=20.0)
    whole, blocks = whole_done.result, blocks_done.result

    stages = [e for e in events if isinstance(e, StageEvent)]
    assert [e.stage for e in stages] == ["decoding", "separating", "encoding"]
    assert stages[1].duration_s == pytest.approx(30.0, abs=0.01)
    fractions = [e.fraction for e in events if isinstance(e, ProgressEvent)]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert blocks.files == whole.files and blocks.duration_s == whole.duration_s
    # stembot's marker in the job's folder is neither delivered nor counted.
    assert MARKER not in whole.files.values() and set(whole.sizes) == set(whole.files)
    assert (tmp_path / "whole" / "stems" / MARKER).is_file()
    assert blocks.mode == whole.mode and blocks.preview == whole.preview == "preview.png"
    for name, file in whole.files.items():
        reference = decode(tmp_path / "whole" / "stems" / file, RATE, 2, Limits())
        estimate = decode(tmp_path / "blocks" / "stems" / file, RATE, 2, Limits())
        assert reference.shape == estimate.shape
        assert snr_db(reference, estimate) > 40, name
    assert (tmp_path / "blocks" / "stems" / "preview.png").stat().st_size > 0
    assert _no_leftovers(tmp_path / "blocks") == []
    assert _no_leftovers(tmp_path / "blocks" / "stems") == []


def test_the_model_host_mixes_and_stretches_a_long_track_staged_on_disk(model_dir, track, tmp_path):
    """A mix at another tempo of a track whose stems are staged on disk (mixed a chunk at a
    time, core.media.render.mix_files): one file, `mix`, as long as the track at that tempo,
    not clipped, and nothing left behind. (In memory: tests/core/media/test_render.py and the
    bot's end-to-end tests.)"""
    options = RenderOptions(tempo=80, mix=(("vocals", 50), ("drums", 100), ("bass", 100)))
    done, _ = _host_run(model_dir, track, tmp_path / "blocks", options.to_column(), block_s=BLOCK_S,
                        blocks_above_s=20.0)
    assert done.result.files == {"mix": "mix.flac"} and done.result.duration_s == pytest.approx(TRACK_S, abs=0.01)
    mixed = decode(tmp_path / "blocks" / "stems" / "mix.flac", RATE, 2, Limits())
    assert mixed.shape[1] / RATE == pytest.approx(TRACK_S / 0.8, abs=0.5)
    assert 0.01 < float(np.max(np.abs(mixed))) < 1.0
    assert _no_leftovers(tmp_path / "blocks") == [] and _no_leftovers(tmp_path / "blocks" / "stems") == []


def test_the_model_host_cleans_up_a_cancelled_long_job(model_dir, track, tmp_path):
    events = _Events()
    cancel: set[int] = set()
    host = SerialHost(JobSteps(HostConfig(model=MODEL, model_dir=str(model_dir), device="cpu", shifts=0,
                                          warm_up=False, block_s=BLOCK_S, blocks_above_s=20.0),
                               events, cancel, parent=os.getppid()))
    original = events.put

    def put(item: HostEvent) -> None:
        original(item)
        if isinstance(item, ProgressEvent):
            cancel.add(9)  # cancel once it is under way

    events.put = put
    host.run(JobSpec(job_id=9, input_path=str(track), stems_dir=str(tmp_path / "stems"), model=MODEL,
                     stems="all", format="flac"))
    assert events.items[-1] == CancelledEvent(9)
    assert list(tmp_path.iterdir()) == []
