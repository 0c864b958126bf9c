"""A model host that takes several jobs at once (as on a GPU) and batches their segments:
a real spawned host with the tiny model, on the CPU."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from core.host.handle import HostCrashed, HostHandle
from core.host.protocol import (
    CancelledEvent,
    DoneEvent,
    FailedEvent,
    HostConfig,
    JobProgressEvent,
    JobSpec,
    ProgressEvent,
    StageEvent,
)
from core.media.audio import Limits, decode
from core.media.stem_files import MARKER
from tests.support.media import ffmpeg, music, snr_db

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

SOURCES = ("drums", "bass", "other", "vocals")
# 2-second segments (tests/support/models.py): many segments, and short blocks, in short songs.
MODEL = "tinyshort"


def config(model_dir, batch_jobs: int, **overrides) -> HostConfig:
    settings = dict(model=MODEL, model_dir=str(model_dir), device="cpu", shifts=0, min_duration_s=1.0,
                    batch_jobs=batch_jobs, batch_segments=2)
    return HostConfig(**{**settings, **overrides})


# Blocks short enough that a 30-second song goes blockwise, in four blocks.
SHORT_BLOCKS = dict(block_s=8.0, blocks_above_s=20.0)


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("songs")
    # Several forward passes each (two segments a pass), so all three are in the host at once.
    return [music(folder / f"song{k}.wav", seconds=seconds, tone=tone)
            for k, (seconds, tone) in enumerate([(15.0, 220.0), (11.0, 330.0), (13.0, 275.0)])]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def batching(model_dir, songs, tmp_path_factory):
    worker = HostHandle(config(model_dir, batch_jobs=3), start_timeout_s=60)
    await worker.start()
    # One job first: its result waits for the host's tempo/key warm-up (numba's compile,
    # up to 30 s on a loaded machine), which would otherwise run beside the tests' jobs.
    first = await asyncio.wait_for(worker.run(spec_for(songs[1], tmp_path_factory.mktemp("first"))), 180)
    assert is_done(first), first
    yield worker
    await worker.stop()


_ids = iter(range(1, 10_000))


def spec_for(path: Path, out: Path, model: str = MODEL) -> JobSpec:
    job_id = next(_ids)
    return JobSpec(job_id=job_id, input_path=str(path), stems_dir=str(out / f"job{job_id}"), model=model,
                   stems="all", format="wav", preview=False, attachment_limit=2**30)


def is_done(result: object) -> bool:
    return isinstance(result, DoneEvent)


def fractions_of(events: list[JobProgressEvent]) -> list[float]:
    return [e.fraction for e in events if isinstance(e, ProgressEvent)]


def stems_of(spec: JobSpec) -> dict[str, np.ndarray]:
    return {name: decode(Path(spec.stems_dir) / f"{name}.wav", 44100, 2, Limits(min_duration_s=0))
            for name in SOURCES}


async def test_concurrent_jobs_share_forward_passes_and_match_one_at_a_time(batching, model_dir, songs, tmp_path):
    assert batching.capacity == 3 and batching.info["capacity"] == 3
    # A long song first, and the two others once it is separating: they are decoded and
    # join its passes however slowly a loaded machine decodes them (started all at once,
    # one could finish before another was decoded).
    together = [music(tmp_path / "first.wav", seconds=60.0, tone=165.0), *songs[:2]]
    specs = [spec_for(song, tmp_path / "together") for song in together]
    events: dict[int, list[JobProgressEvent]] = {s.job_id: [] for s in specs}
    separating = asyncio.Event()

    def on_first(event: JobProgressEvent) -> None:
        events[specs[0].job_id].append(event)
        if isinstance(event, ProgressEvent):
            separating.set()

    first = asyncio.create_task(batching.run(specs[0], on_first))
    await asyncio.wait_for(separating.wait(), 120)
    results = await asyncio.wait_for(asyncio.gather(
        first, *(batching.run(spec, events[spec.job_id].append) for spec in specs[1:])), 180)
    assert [is_done(r) for r in results] == [True] * 3, results
    done = [r for r in results if isinstance(r, DoneEvent)]
    assert max(r.result.batched_jobs or 0 for r in done) >= 2, "segments of different jobs must share passes"
    for spec in specs:
        stages = [e.stage for e in events[spec.job_id] if isinstance(e, StageEvent)]
        assert stages == ["decoding", "separating", "encoding"]
        fractions = fractions_of(events[spec.job_id])
        assert fractions == sorted(fractions) and fractions[-1] == 1.0

    alone = HostHandle(config(model_dir, batch_jobs=1), start_timeout_s=60)
    await alone.start()
    try:
        assert alone.capacity == 1
        for song, spec in zip(together, specs, strict=True):
            single = spec_for(song, tmp_path / "alone")
            result = await asyncio.wait_for(alone.run(single), 120)
            assert isinstance(result, DoneEvent) and result.result.batched_jobs is None
            batched, reference = stems_of(spec), stems_of(single)
            for name in SOURCES:
                assert snr_db(reference[name], batched[name]) > 60, (song.name, name)
    finally:
        await alone.stop()


async def test_cancelling_one_job_leaves_the_others_running(batching, songs, tmp_path):
    keep, drop = spec_for(songs[0], tmp_path), spec_for(songs[2], tmp_path)

    def on_event(event: JobProgressEvent) -> None:
        if isinstance(event, ProgressEvent):
            batching.cancel(drop.job_id)

    results = await asyncio.wait_for(asyncio.gather(batching.run(keep), batching.run(drop, on_event)), 120)
    assert is_done(results[0]) and results[1] == CancelledEvent(drop.job_id)
    # The stems, and stembot's marker of a folder it made (core.media.stem_files).
    assert sorted(p.name for p in Path(keep.stems_dir).iterdir()) == [MARKER, *(f"{n}.wav" for n in sorted(SOURCES))]
    assert not Path(drop.stems_dir).exists()


async def test_a_bad_input_fails_alone(batching, songs, tmp_path):
    bad = tmp_path / "notes.mp3"
    bad.write_text("not a song\n" * 500)
    results = await asyncio.wait_for(asyncio.gather(
        batching.run(spec_for(songs[1], tmp_path)), batching.run(spec_for(bad, tmp_path))), 120)
    assert is_done(results[0])
    assert isinstance(results[1], FailedEvent) and results[1].kind != "error"


async def test_a_killed_host_fails_every_job_it_held_and_is_replaced(batching, songs, tmp_path):
    old_pid = batching.pid

    def kill_once_separating(event: JobProgressEvent) -> None:
        if isinstance(event, ProgressEvent) and batching.pid == old_pid:
            os.kill(old_pid, signal.SIGKILL)

    outcomes = await asyncio.wait_for(asyncio.gather(
        batching.run(spec_for(songs[0], tmp_path), kill_once_separating),
        batching.run(spec_for(songs[2], tmp_path)), return_exceptions=True), 120)
    assert all(isinstance(o, HostCrashed) for o in outcomes), outcomes
    assert batching.alive() and batching.ready and batching.pid != old_pid
    assert not batching.current_jobs
    result = await asyncio.wait_for(batching.run(spec_for(songs[1], tmp_path)), 120)
    assert is_done(result)


@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory) -> Path:
    """`tiny` and models with its weights that fail as models can on a GPU."""
    from tests.support import models as tiny
    from tests.support.faulty_models import AlwaysOutOfMemory, BreaksOnTrueStereo, OutOfMemoryAbove2

    folder = tmp_path_factory.mktemp("faulty")
    tiny.save_th(tiny.tiny_htdemucs(seed=0), folder, "tiny")
    tiny.save_th(tiny.tiny_htdemucs(seed=0, klass=OutOfMemoryAbove2), folder, "tinyoom")
    tiny.save_th(tiny.tiny_htdemucs(seed=0, klass=AlwaysOutOfMemory), folder, "tinynomem")
    tiny.save_th(tiny.tiny_htdemucs(seed=0, klass=BreaksOnTrueStereo), folder, "tinystereo")
    return folder


@pytest_asyncio.fixture(loop_scope="module")
async def faulty_host(faulty_dir):
    # Four segments a pass to begin with: more than OutOfMemoryAbove2 takes.
    worker = HostHandle(config(faulty_dir, batch_jobs=3, batch_segments=4, model="tiny"), start_timeout_s=60)
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture(scope="module")
def short_songs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("short")
    return [music(folder / f"short{k}.wav", seconds=20.0, tone=tone) for k, tone in enumerate((220.0, 330.0))]


async def test_running_out_of_memory_shrinks_the_passes_and_fails_no_job(faulty_host, short_songs, tmp_path):
    specs = [spec_for(song, tmp_path / "oom", model="tinyoom") for song in short_songs]
    results = await asyncio.wait_for(asyncio.gather(*(faulty_host.run(spec) for spec in specs)), 120)
    assert [is_done(r) for r in results] == [True] * 2, results
    for song, spec in zip(short_songs, specs, strict=True):
        alone = spec_for(song, tmp_path / "alone", model="tiny")
        assert is_done(await asyncio.wait_for(faulty_host.run(alone), 120))
        reference, recovered = stems_of(alone), stems_of(spec)
        for name in SOURCES:
            assert snr_db(reference[name], recovered[name]) > 60, (song.name, name)


async def test_a_pass_that_fails_for_one_track_fails_that_job_only(faulty_host, short_songs, tmp_path):
    culprit = tmp_path / "stereo.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=f=220:d=20", "-f", "lavfi", "-i", "sine=f=330:d=20",
           "-filter_complex", "[0][1]join=inputs=2:channel_layout=stereo", "-ar", "44100", str(culprit))
    specs = [spec_for(path, tmp_path, model="tinystereo") for path in (*short_songs, culprit)]
    pid = faulty_host.pid
    results = await asyncio.wait_for(asyncio.gather(*(faulty_host.run(spec) for spec in specs)), 120)
    assert [type(r) for r in results] == [DoneEvent, DoneEvent, FailedEvent], results
    assert isinstance(results[2], FailedEvent) and results[2].reason == "internal error (RuntimeError)"
    assert faulty_host.pid == pid and faulty_host.alive()


async def test_a_track_too_big_even_one_segment_a_pass_fails_with_a_clear_reason(faulty_host, short_songs, tmp_path):
    result = await asyncio.wait_for(faulty_host.run(spec_for(short_songs[0], tmp_path, model="tinynomem")), 120)
    assert isinstance(result, FailedEvent) and result.kind == "out_of_memory", result
    assert result.reason == "the worker ran out of memory separating this track; try again later"
    assert is_done(await asyncio.wait_for(faulty_host.run(spec_for(short_songs[1], tmp_path, model="tiny")), 120))


async def test_a_long_track_shares_passes_block_by_block(model_dir, short_songs, tmp_path):
    # Long enough that the short song, decoded after the long one's first progress, still
    # finds blocks to share on a loaded machine (30 s of tiny-model work was over too soon).
    long_song = music(tmp_path / "long.wav", seconds=90.0, tone=275.0)
    outcomes = {}
    for label, batch_jobs in (("together", 3), ("alone", 1)):
        worker = HostHandle(config(model_dir, batch_jobs, **SHORT_BLOCKS), start_timeout_s=60)
        await worker.start()
        try:
            specs = [spec_for(long_song, tmp_path / label), spec_for(short_songs[0], tmp_path / label)]
            events: list[JobProgressEvent] = []
            separating = asyncio.Event()

            # Bound now: the host calls it only during this iteration.
            def on_event(event: JobProgressEvent, events: list[JobProgressEvent] = events,
                         separating: asyncio.Event = separating) -> None:
                events.append(event)
                if isinstance(event, ProgressEvent):
                    separating.set()

            # The short song comes once the long one is in the passes, with blocks to go.
            long_run = asyncio.ensure_future(worker.run(specs[0], on_event))
            await asyncio.wait_for(separating.wait(), 60)
            results = await asyncio.wait_for(asyncio.gather(long_run, worker.run(specs[1])), 180)
        finally:
            await worker.stop()
        assert [is_done(r) for r in results] == [True, True], results
        assert isinstance(results[0], DoneEvent) and results[0].result.duration_s == pytest.approx(90.0, abs=0.01)
        fractions = fractions_of(events)
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert [p.name for p in (tmp_path / label).iterdir() if "partial" in p.name] == []
        outcomes[label] = (results, [stems_of(spec) for spec in specs])
    assert outcomes["together"][0][0].result.batched_jobs == 2  # the long track's blocks shared passes
    for together, alone in zip(outcomes["together"][1], outcomes["alone"][1], strict=True):
        for name in SOURCES:
            assert snr_db(alone[name], together[name]) > 60, name


async def test_cancelling_a_long_track_between_blocks_cleans_up(model_dir, short_songs, tmp_path):
    # Long enough that the short song, decoded after the long one's first progress, still
    # finds blocks to share on a loaded machine (30 s of tiny-model work was over too soon).
    long_song = music(tmp_path / "long.wav", seconds=90.0, tone=275.0)
    worker = HostHandle(config(model_dir, batch_jobs=3, **SHORT_BLOCKS), start_timeout_s=60)
    await worker.start()
    try:
        drop, keep = spec_for(long_song, tmp_path / "out"), spec_for(short_songs[1], tmp_path / "out")

        def on_event(event: JobProgressEvent) -> None:
            if isinstance(event, ProgressEvent) and event.fraction > 0.4:  # past the first block
                worker.cancel(drop.job_id)

        results = await asyncio.wait_for(asyncio.gather(worker.run(drop, on_event), worker.run(keep)), 180)
    finally:
        await worker.stop()
    assert results[0] == CancelledEvent(drop.job_id) and is_done(results[1])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(keep.stems_dir).name]


async def test_a_checkpoint_model_job_runs_alone_beside_batched_ones(batching, model_dir, songs, tmp_path):
    """A community checkpoint (`tinyroformer`) does not share the batcher's passes: the host
    separates it on its own, and the demucs jobs with it still finish."""
    demucs = spec_for(songs[1], tmp_path)
    roformer = spec_for(songs[0], tmp_path, model="tinyroformer")
    events: list[JobProgressEvent] = []
    results = await asyncio.wait_for(asyncio.gather(batching.run(demucs), batching.run(roformer, events.append)), 120)
    assert [is_done(r) for r in results] == [True, True], results
    assert sorted(p.name for p in Path(roformer.stems_dir).glob("*.wav")) == ["instrumental.wav", "vocals.wav"]
    fractions = fractions_of(events)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 2
