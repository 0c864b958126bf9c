"""core.separation.checkpoint_engine: the service guarantees of the Demucs engine for a community
checkpoint (`tinyroformer` of the `model_dir` fixture, a tiny BS-RoFormer vocals model):
progress while separating, cancel at the next chunk, long tracks in blocks, several tracks
sharing forward passes, mixed precision; and through a real model host, stems written with
the shared anti-clip gain."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from core.errors import BadRequestError, JobCancelled
from core.host.protocol import DoneEvent, HostConfig, HostEvent, JobSpec
from core.host.serial_host import SerialHost
from core.host.steps import JobSteps
from core.media.audio import Limits, decode
from core.separation import blockwise
from core.separation.checkpoint_engine import CheckpointEngine
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import parse_stems
from tests.support.media import music, snr_db

MODEL = "tinyroformer"
EXACT = SeparationOptions(shifts=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    return SeparationEngine.load(MODEL, model_dir, "cpu")


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return decode(music(tmp_path_factory.mktemp("in") / "song.wav", seconds=6.0), 44100, 2, Limits())


def test_loads_beside_demucs_models_and_names_its_stems(engine, model_dir):
    assert isinstance(engine, CheckpointEngine)
    assert (engine.name, engine.sources, engine.samplerate, engine.audio_channels) == (
        MODEL, ["vocals", "instrumental"], 44100, 2)
    # The demucs models of the same folder still load as before.
    assert not isinstance(SeparationEngine.load("tiny", model_dir, "cpu"), CheckpointEngine)


def test_progress_rises_chunk_by_chunk_to_one(engine, mix):
    fractions: list[float] = []
    engine.separate(mix, parse_stems("all", engine.sources), EXACT, progress=fractions.append)
    chunks = len(engine.start_work(mix).plan.starts)
    assert chunks >= 5
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert len([f for f in fractions if f < 1.0]) >= chunks  # at least once a chunk


def test_cancel_stops_at_the_next_chunk(engine, mix):
    fractions: list[float] = []
    forward = engine.forward_seconds

    def cancelled() -> bool:
        return bool(fractions)  # from the first report on

    with pytest.raises(JobCancelled):
        engine.separate(mix, parse_stems("all", engine.sources), EXACT, progress=fractions.append,
                        should_cancel=cancelled)
    chunks = len(engine.start_work(mix).plan.starts)
    assert max(fractions) <= 2 / chunks  # within the first or second chunk
    assert engine.forward_seconds > forward


def test_karaoke_and_single_stems(engine, mix):
    stems = engine.separate(mix, parse_stems("karaoke", engine.sources), EXACT)
    assert list(stems) == ["vocals", "no_vocals"]
    np.testing.assert_allclose(stems["vocals"] + stems["no_vocals"], mix, atol=1e-5)
    with pytest.raises(BadRequestError, match="unknown stem 'drums'"):
        parse_stems("drums", engine.sources)


def test_several_tracks_share_forward_passes_with_the_same_result(engine, mix):
    other = mix[:, : mix.shape[1] // 2] * 0.5
    alone = [engine.separate(m, parse_stems("all", engine.sources), EXACT) for m in (mix, other)]
    together = engine.separate_many([mix, other], parse_stems("all", engine.sources), EXACT, batch_size=4)
    for one, shared in zip(alone, together, strict=True):
        for stem in one:
            assert snr_db(one[stem], shared[stem]) > 80.0


def test_bf16_is_close_to_fp32(engine, mix):
    request = parse_stems("vocals", engine.sources)
    full = engine.separate(mix, request, EXACT)["vocals"]
    half = engine.separate(mix, request, SeparationOptions(shifts=0, precision="bf16"))["vocals"]
    assert 10.0 < snr_db(full, half) < 200.0


def test_a_long_track_in_blocks_equals_the_whole_track(engine, tmp_path):
    track = music(tmp_path / "long.wav", seconds=24.0, tone=330.0)
    request = parse_stems("all", engine.sources)
    whole = engine.separate(decode(track, 44100, 2, Limits()), request, EXACT)
    work = tmp_path / "work"
    work.mkdir()
    staged = blockwise.stage_input(track, engine, Limits(), work)
    fractions: list[float] = []
    stems = blockwise.separate_staged(staged, engine, request, EXACT, work, progress=fractions.append, block_s=8.0)
    stride, context = blockwise.model_grid(engine, request, EXACT)
    assert (stride, context) == (engine.start_work(whole["vocals"]).plan.step,
                                 engine.start_work(whole["vocals"]).plan.chunk)
    assert len(blockwise.plan_blocks(staged.frames, 8 * 44100, context, 44100, stride)) >= 3
    for name, path in stems.paths.items():
        blocks = np.fromfile(path, dtype="<f4").reshape(-1, 2).T
        assert blocks.shape == whole[name].shape
        assert snr_db(whole[name], blocks) > 60.0, name
    assert fractions[-1] == 1.0


def test_a_model_host_writes_the_stems_with_the_shared_anti_clip_gain(model_dir, tmp_path):
    # Loud enough that the stems clip without the gain.
    song = music(tmp_path / "loud.wav", seconds=4.0, volume=10.0, extra=("-c:a", "pcm_f32le"))  # peaks at 1.4
    events: list[HostEvent] = []

    class Sink:
        def put(self, event: HostEvent) -> None:
            events.append(event)

    steps = JobSteps(HostConfig(model=MODEL, model_dir=str(model_dir), device="cpu", shifts=0, warm_up=False,
                                log_level=logging.WARNING, block_s=None), Sink(), set(), parent=os.getppid())
    SerialHost(steps).run(JobSpec(job_id=1, input_path=str(song), stems_dir=str(tmp_path / "stems"), model=MODEL,
                                  stems="all", format="flac"))
    assert isinstance(events[-1], DoneEvent), events[-1]
    written = {path.stem: decode(path, 44100, 2, Limits()) for path in (tmp_path / "stems").rglob("*.flac")}
    assert set(written) == {"vocals", "instrumental"}
    assert max(float(np.abs(stem).max()) for stem in written.values()) <= 1.0
    mix = decode(song, 44100, 2, Limits())
    total = written["vocals"] + written["instrumental"]
    gain = float(np.sum(total * mix) / np.sum(mix * mix))
    assert 0.3 < gain < 0.95  # one gain for every stem: they still sum to (a scaled) mix
    assert snr_db(mix * gain, total) > 30.0
