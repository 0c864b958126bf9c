"""ffprobe and ffmpeg, as the bot and the model host run them, start without the bot's secrets."""

from __future__ import annotations

import os

from core.media.audio import OutputFormat, decode, encode_stems, probe
from core.media.preview import render_preview
from tests.support.media import music
from tests.support.secrets_env import ToolRecorder, leaked, parse_environ, put_secrets


def test_ffprobe_and_ffmpeg_see_none_of_the_secrets(tmp_path, monkeypatch):
    song = music(tmp_path / "song.wav", seconds=3.0)  # before the recorder: this ffmpeg is the test's
    put_secrets(monkeypatch)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    recorder = ToolRecorder(tmp_path / "record", monkeypatch)

    info = probe(song)
    mix = decode(song, info.sample_rate, 2, info=info)
    stems = encode_stems({"vocals": mix, "other": mix * 0.5}, info.sample_rate, tmp_path / "stems",
                         OutputFormat("flac"))
    render_preview(stems, tmp_path / "preview.png")
    render_preview(stems, tmp_path / "bounded.png", bounded=True)

    runs = recorder.runs()
    # ffprobe: the song, then each stem for the bounded preview; ffmpeg: decode, two encodes, a
    # preview, and for the bounded one a decode of each stem and the drawing.
    assert [tool for tool, _ in runs].count("ffprobe") == 3
    assert [tool for tool, _ in runs].count("ffmpeg") == 7
    for tool, raw in runs:
        assert leaked(raw) == [], tool
        env = parse_environ(raw)
        assert env["PATH"] == os.environ["PATH"] and env["LC_ALL"] == "C.UTF-8", tool
