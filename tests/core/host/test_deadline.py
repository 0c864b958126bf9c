"""core.host.handle: a job's deadline on a real spawned model host. A model that hangs in
its forward pass on true stereo (tests/support/faulty_models.py) is killed at the deadline
and started again; finished jobs give the host its measured speed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.host.handle import Deadline, HostHandle, HostTimedOut
from core.host.protocol import DoneEvent, HostConfig, JobSpec
from tests.support import models as tiny
from tests.support.media import ffmpeg, music


@pytest.fixture(scope="module")
def hang_dir(tmp_path_factory) -> Path:
    from tests.support.faulty_models import HangsOnTrueStereo

    folder = tmp_path_factory.mktemp("hang")
    tiny.save_th(tiny.tiny_htdemucs(seed=0, klass=HangsOnTrueStereo), folder, "tinyhang")
    return folder


def spec(path: Path, out: Path, job_id: int) -> JobSpec:
    return JobSpec(job_id=job_id, input_path=str(path), stems_dir=str(out / str(job_id)), model="tinyhang",
                   stems="all", format="mp3")


async def test_a_host_hung_past_the_deadline_is_killed_and_restarted_and_speed_is_measured(hang_dir, tmp_path):
    stereo = tmp_path / "stereo.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=f=220:d=3", "-f", "lavfi", "-i", "sine=f=330:d=3",
           "-filter_complex", "[0][1]join=inputs=2:channel_layout=stereo", "-ar", "44100", str(stereo))
    mono = music(tmp_path / "mono.wav", seconds=3.0)
    config = HostConfig(model="tinyhang", model_dir=str(hang_dir), device="cpu", shifts=0, min_duration_s=1.0)
    host = HostHandle(config, start_timeout_s=120, deadline=Deadline(margin_s=15.0, factor=1.0, default_speed=1.0))
    await host.start()
    try:
        hung_pid = host.pid
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(HostTimedOut):
            await asyncio.wait_for(host.run(spec(stereo, tmp_path, 1)), 120)
        # The deadline counts from the start of the separation: 15 + 1 x 3 s x 1.
        assert loop.time() - started >= 18.0
        assert host.alive() and host.ready and host.pid != hung_pid
        assert not host.current_jobs and host.speed is None  # nothing measured from a job that hung

        done = await asyncio.wait_for(host.run(spec(mono, tmp_path, 2)), 120)
        assert isinstance(done, DoneEvent)
        assert host.speed == pytest.approx(done.result.separation_s / done.result.duration_s)
    finally:
        await host.stop()


def test_the_deadline_follows_the_measured_speed():
    deadline = Deadline(margin_s=60.0, factor=3.0, default_speed=2.0)
    assert deadline.seconds(100.0, None) == 60.0 + 3.0 * 100.0 * 2.0
    assert deadline.seconds(100.0, 0.25) == 60.0 + 3.0 * 100.0 * 0.25
