"""core.host.handle: the HostHandle supervising a real spawned model host with a tiny model."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import pytest_asyncio

from core.host.handle import HostCrashed, HostHandle, HostUnavailable
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
from core.media.audio import Limits, decode, probe
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="module")

SOURCES = ("drums", "bass", "other", "vocals")


def config(model_dir, model: str = "tiny") -> HostConfig:
    return HostConfig(model=model, model_dir=str(model_dir), device="cpu", shifts=0, min_duration_s=1.0)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    bad = folder / "notes.mp3"
    bad.write_text("These are my lyrics, not a song.\n" * 200)
    return {
        "short": music(folder / "short.wav", seconds=4.0),
        "medium": music(folder / "medium.wav", seconds=30.0, tone=330.0),
        "long": music(folder / "long.wav", seconds=75.0, tone=220.0),
        "bad": bad,
    }


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(model_dir):
    """One host for the module (each spawn imports torch anew, which takes seconds)."""
    worker = HostHandle(config(model_dir), start_timeout_s=60)
    info = await worker.start()
    worker.first_info = info
    yield worker
    await worker.stop()


_ids = iter(range(1, 10_000))


def spec_for(path: Path, out: Path, *, stems: str = "all", fmt: str = "flac", **extra) -> JobSpec:
    job_id = next(_ids)
    return JobSpec(job_id=job_id, input_path=str(path), stems_dir=str(out / f"job{job_id}"), model="tiny",
                   stems=stems, format=fmt, **extra)


async def run_ok(worker: HostHandle, spec: JobSpec, events: list | None = None) -> DoneEvent:
    result = await asyncio.wait_for(worker.run(spec, events.append if events is not None else None), 60)
    assert isinstance(result, DoneEvent), result
    return result


def stages_of(events: list[JobProgressEvent]) -> list[str]:
    return [event.stage for event in events if isinstance(event, StageEvent)]


def fractions_of(events: list[JobProgressEvent]) -> list[float]:
    return [event.fraction for event in events if isinstance(event, ProgressEvent)]


def label(event: JobProgressEvent) -> str:
    """A stage event's stage, else the event's class."""
    return event.stage if isinstance(event, StageEvent) else type(event).__name__


# -- start and a job -----------------------------------------------------------------------


async def test_start_reports_ready_with_timings(worker):
    info = worker.first_info
    assert info["type"] == "ready" and info["model"] == "tiny" and info["device"] == "cpu"
    assert info["pid"] == worker.pid and worker.pid != os.getpid()
    assert info["load_s"] >= 0 and info["warmup_s"] > 0
    assert info["start_s"] >= info["load_s"] + info["warmup_s"]
    assert worker.ready and worker.alive()


async def test_a_job_runs_and_reports_every_stage(worker, media, tmp_path):
    events: list[JobProgressEvent] = []
    spec = spec_for(media["short"], tmp_path)
    done = await run_ok(worker, spec, events)
    result = done.result

    assert done.job == spec.job_id
    assert set(result.files) == set(SOURCES)
    assert result.files == {name: f"{name}.flac" for name in SOURCES}
    assert result.duration_s == pytest.approx(4.0, abs=0.05)
    assert result.separation_s > 0 and result.mode == "attach"
    folder = Path(spec.stems_dir)
    for name, file in result.files.items():
        path = folder / file
        assert path.stat().st_size == result.sizes[name] > 0
        info = probe(path, Limits(min_duration_s=0))
        assert info.codec == "flac"
        audio = decode(path, 44100, 2, Limits(min_duration_s=0))
        assert audio.shape[0] == 2 and abs(audio.shape[1] - 4 * 44100) < 2048
    assert result.preview and (folder / result.preview).is_file()

    assert all(event.job == spec.job_id for event in events)
    stages = stages_of(events)
    assert stages == ["decoding", "separating", "encoding"]
    separating = next(e for e in events if isinstance(e, StageEvent) and e.stage == "separating")
    assert separating.duration_s == pytest.approx(4.0, abs=0.05)
    fractions = fractions_of(events)
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    # Progress comes between the separating and encoding stages.
    kinds = [label(e) for e in events]
    assert kinds.index("separating") < kinds.index("ProgressEvent") and kinds[-1] == "encoding"


async def test_progress_rises_through_a_longer_job_and_stems_subsets(worker, media, tmp_path):
    events: list[JobProgressEvent] = []
    spec = spec_for(media["medium"], tmp_path, stems="karaoke", fmt="wav")
    done = await run_ok(worker, spec, events)
    assert done.result.files == {"vocals": "vocals.wav", "no_vocals": "no_vocals.wav"}
    assert sorted(p.name for p in Path(spec.stems_dir).glob("*.wav")) == ["no_vocals.wav", "vocals.wav"]
    fractions = fractions_of(events)
    assert len(fractions) >= 3  # reported along the way, not only at the end
    assert fractions == sorted(fractions) and len(set(fractions)) == len(fractions)
    assert 0 < fractions[1] < 1.0 and fractions[-1] == 1.0


async def test_async_event_handlers_are_awaited(worker, media, tmp_path):
    seen: list[str] = []

    async def handler(event: JobProgressEvent) -> None:
        await asyncio.sleep(0)
        seen.append(type(event).__name__)

    result = await worker.run(spec_for(media["short"], tmp_path), handler)
    assert isinstance(result, DoneEvent)
    assert seen.count("StageEvent") == 3 and "ProgressEvent" in seen


# -- failures the host lives through -------------------------------------------------------


async def test_bad_input_fails_with_a_user_reason_and_the_host_lives_on(worker, media, tmp_path):
    pid = worker.pid
    spec = spec_for(media["bad"], tmp_path)
    result = await asyncio.wait_for(worker.run(spec), 60)
    assert isinstance(result, FailedEvent) and result.job == spec.job_id
    reason = result.reason
    assert reason and "Traceback" not in reason and "File \"" not in reason and "internal error" not in reason
    assert len(reason) < 300
    assert result.kind in ("not_audio", "corrupt", "unsupported")
    assert not Path(spec.stems_dir).exists()

    assert worker.alive() and worker.ready and worker.pid == pid
    await run_ok(worker, spec_for(media["short"], tmp_path))
    assert worker.pid == pid


async def test_too_short_input_fails_with_its_kind(worker, tmp_path):
    blip = music(tmp_path / "blip.wav", seconds=0.3)
    result = await worker.run(spec_for(blip, tmp_path))
    assert isinstance(result, FailedEvent) and result.kind == "too_short"
    assert "Traceback" not in result.reason


async def test_bad_stem_request_fails_cleanly(worker, media, tmp_path):
    result = await worker.run(spec_for(media["short"], tmp_path, stems="vocals,kazoo"))
    assert isinstance(result, FailedEvent) and result.kind == "bad_request"
    assert "kazoo" in result.reason


async def test_cancel_stops_a_job_within_a_segment_and_the_host_lives_on(worker, media, tmp_path):
    pid = worker.pid
    spec = spec_for(media["long"], tmp_path)
    cancelled_at: list[float] = []
    events: list[JobProgressEvent] = []

    def on_event(event: JobProgressEvent) -> None:
        events.append(event)
        if isinstance(event, ProgressEvent) and not cancelled_at:
            cancelled_at.append(time.monotonic())
            worker.cancel(spec.job_id)

    started = time.monotonic()
    result = await asyncio.wait_for(worker.run(spec, on_event), 60)
    ended = time.monotonic()
    assert result == CancelledEvent(spec.job_id)
    assert cancelled_at, "no progress event arrived before the job ended"
    assert ended - cancelled_at[0] < 3.0
    # It stopped early: the whole separation would have reported up to 1.0.
    assert max(fractions_of(events)) < 0.5
    assert "encoding" not in stages_of(events)
    assert ended - started < 20

    assert worker.alive() and worker.ready and worker.pid == pid
    follow = spec_for(media["short"], tmp_path)
    await run_ok(worker, follow)
    assert (Path(follow.stems_dir) / "vocals.flac").is_file()


async def test_cancelling_another_job_does_not_stop_this_one(worker, media, tmp_path):
    spec = spec_for(media["short"], tmp_path)

    def on_event(event: JobProgressEvent) -> None:
        if isinstance(event, StageEvent) and event.stage == "separating":
            worker.cancel(spec.job_id + 777)

    result = await worker.run(spec, on_event)
    assert isinstance(result, DoneEvent)


async def test_a_cancel_left_from_a_previous_job_does_not_stop_the_next(worker, media, tmp_path):
    first = spec_for(media["short"], tmp_path)
    await run_ok(worker, first)
    second = spec_for(media["short"], tmp_path)
    worker.cancel(second.job_id)  # asked before it ran: run() starts every job clean
    await run_ok(worker, second)


# -- a crash -------------------------------------------------------------------------------


async def test_a_killed_host_raises_worker_crashed_and_is_replaced(worker, media, tmp_path):
    old_pid = worker.pid
    spec = spec_for(media["medium"], tmp_path)
    killed: list[int] = []

    def on_event(event: JobProgressEvent) -> None:
        if isinstance(event, StageEvent) and event.stage == "separating" and not killed:
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)

    with pytest.raises(HostCrashed, match="died"):
        await asyncio.wait_for(worker.run(spec, on_event), 60)
    assert killed == [old_pid]
    assert worker.alive() and worker.ready
    assert worker.pid is not None and worker.pid != old_pid
    assert worker.info["pid"] == worker.pid
    assert not worker.current_jobs
    # The old process is gone for good (reaped, not a zombie left to the test run).
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)

    follow = spec_for(media["short"], tmp_path)
    result = await run_ok(worker, follow)
    assert set(result.result.files) == set(SOURCES)
    assert worker.pid != old_pid


async def test_a_host_that_died_between_jobs_is_restarted_by_the_next_run(worker, media, tmp_path):
    old_pid = worker.pid
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while worker.alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not worker.alive()
    result = await run_ok(worker, spec_for(media["short"], tmp_path))
    assert result.result.files["vocals"] == "vocals.flac"
    assert worker.alive() and worker.pid != old_pid


# -- a model that is not there -------------------------------------------------------------


async def test_an_unavailable_model_is_reported_by_start(model_dir):
    worker = HostHandle(config(model_dir, model="nosuchmodel"), start_timeout_s=60)
    started = time.monotonic()
    try:
        with pytest.raises(HostUnavailable) as caught:
            await worker.start()
        assert time.monotonic() - started < 10
        assert "nosuchmodel" in caught.value.reason
        assert "Traceback" not in caught.value.reason
        assert caught.value.kind == "worker_unavailable"
        assert not worker.ready and not worker.alive() and worker.pid is None
    finally:
        await worker.stop()
