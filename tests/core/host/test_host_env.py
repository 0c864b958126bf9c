"""The model host and the ffmpeg and ffprobe it runs start without the bot's (or a worker's) secrets,
and still find their model, caches and settings."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from core.host.handle import HostHandle
from core.host.protocol import DoneEvent, HostConfig, JobSpec
from tests.support.media import music
from tests.support.secrets_env import ToolRecorder, leaked, parse_environ, put_secrets


async def test_the_model_host_and_its_decoders_see_none_of_the_secrets(model_dir, tmp_path, monkeypatch):
    song = music(tmp_path / "song.wav", seconds=4.0)  # before the recorder: this ffmpeg is the test's
    put_secrets(monkeypatch)
    # What an operator sets for the host: passed on.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # for a model download
    recorder = ToolRecorder(tmp_path / "record", monkeypatch)

    host = HostHandle(HostConfig(model="tiny", model_dir=str(model_dir), device="cpu", shifts=0, nice=3),
                      start_timeout_s=60)
    await host.start()
    try:
        assert host.pid is not None
        host_environ = Path(f"/proc/{host.pid}/environ").read_bytes()
        assert os.getpriority(os.PRIO_PROCESS, host.pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 3
        spec = JobSpec(job_id=1, input_path=str(song), stems_dir=str(tmp_path / "stems"), model="tiny",
                       stems="all", format="mp3")
        result = await asyncio.wait_for(host.run(spec), 60)
        assert isinstance(result, DoneEvent), result
    finally:
        await host.stop()

    assert leaked(host_environ) == []
    env = parse_environ(host_environ)
    assert {name: env.get(name) for name in ("PATH", "HF_HOME", "TORCH_HOME", "OMP_NUM_THREADS", "HTTPS_PROXY")} == {
        name: os.environ[name] for name in ("PATH", "HF_HOME", "TORCH_HOME", "OMP_NUM_THREADS", "HTTPS_PROXY")}
    runs = recorder.runs()
    assert {"ffprobe", "ffmpeg"} <= {tool for tool, _ in runs}
    for tool, raw in runs:
        assert leaked(raw) == [], tool
        assert "HTTPS_PROXY" not in parse_environ(raw), tool  # decoders reach no network
