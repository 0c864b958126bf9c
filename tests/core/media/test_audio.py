"""core.media.audio against real ffmpeg: every input format, every output format, limits, bad files."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from core.errors import (
    CorruptMediaError,
    NotAudioError,
    TooLargeError,
    TooLongError,
    TooShortError,
    UnsupportedMediaError,
)
from core.media.audio import Limits, OutputFormat, clip_gain, decode, encode_stems, probe
from tests.support.media import dominant_frequency, ffmpeg, music, snr_db

RATE = 44100

# (file name, extra ffmpeg output args, source sample rate, source channels)
FORMATS = [
    ("pcm16.wav", ("-c:a", "pcm_s16le"), 44100, 2),
    ("pcm24.wav", ("-c:a", "pcm_s24le"), 48000, 2),
    ("float32.wav", ("-c:a", "pcm_f32le"), 44100, 2),
    ("song.flac", (), 44100, 2),
    ("song.mp3", ("-c:a", "libmp3lame", "-b:a", "192k"), 44100, 2),
    ("song.ogg", ("-c:a", "libvorbis"), 44100, 2),
    ("song.opus", ("-c:a", "libopus"), 48000, 2),
    ("song.m4a", ("-c:a", "aac"), 44100, 2),
    ("song.webm", ("-c:a", "libopus"), 48000, 2),
    ("mono.wav", (), 44100, 1),
    ("low_rate.wav", (), 22050, 2),
    ("surround.flac", ("-channel_layout", "5.1"), 44100, 6),
]


@pytest.mark.parametrize("name,extra,rate,channels", FORMATS, ids=[f[0] for f in FORMATS])
def test_decode_any_format_to_model_rate_and_channels(tmp_path, name, extra, rate, channels):
    path = music(tmp_path / name, seconds=3.0, rate=rate, channels=channels, tone=440.0, extra=extra)
    info = probe(path)
    assert info.channels == channels
    audio = decode(path, RATE, 2, info=info)
    assert audio.dtype == np.float32 and audio.shape[0] == 2
    # Lossy codecs add a little priming; the length must still be about right.
    assert abs(audio.shape[1] / RATE - 3.0) < 0.1
    assert dominant_frequency(audio, RATE) == pytest.approx(440.0, abs=3.0)
    assert 0.02 < float(np.abs(audio).max()) <= 1.0


def test_decode_video_file_takes_its_audio_track(tmp_path):
    audio_path = music(tmp_path / "a.wav", seconds=3.0)
    video = tmp_path / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=3", "-i", str(audio_path),
           "-c:v", "libx264" if _has_encoder("libx264") else "mpeg4", "-c:a", "aac", "-shortest", str(video))
    audio = decode(video, RATE, 2)
    assert dominant_frequency(audio, RATE) == pytest.approx(440.0, abs=3.0)


def test_mono_is_upmixed_to_identical_channels(tmp_path):
    audio = decode(music(tmp_path / "m.wav", channels=1), RATE, 2)
    np.testing.assert_array_equal(audio[0], audio[1])


def test_decode_pcm16_is_exact(tmp_path):
    path = music(tmp_path / "x.wav", seconds=2.0, extra=("-c:a", "pcm_s16le"))
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-"],
                         capture_output=True, check=True).stdout
    expected = np.frombuffer(raw, "<i2").reshape(-1, 2).T / 32768.0
    np.testing.assert_allclose(decode(path, RATE, 2), expected, atol=1e-7)


def _has_encoder(name: str) -> bool:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return f" {name} " in out


# -- encoding ----------------------------------------------------------------------------


def _stems(seconds=2.0):
    t = np.arange(int(RATE * seconds)) / RATE
    tone = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    return {"vocals": np.stack([tone, tone]), "drums": np.stack([tone * 0.5, tone * 0.3])}


@pytest.mark.parametrize("fmt,codec,min_snr", [
    (OutputFormat("wav", wav_depth="float"), "pcm_f32le", 140),
    (OutputFormat("wav", wav_depth="24"), "pcm_s24le", 120),
    (OutputFormat("wav", wav_depth="16"), "pcm_s16le", 75),
    (OutputFormat("flac", wav_depth="16"), "flac", 75),
    (OutputFormat("flac", wav_depth="24"), "flac", 120),
    (OutputFormat("mp3", mp3_bitrate_kbps=320), "mp3", 15),
    (OutputFormat("mp3", mp3_bitrate_kbps=128), "mp3", 15),
    (OutputFormat("opus"), "opus", 10),
])
def test_encode_round_trip(tmp_path, fmt, codec, min_snr):
    stems = _stems()
    paths = encode_stems(stems, RATE, tmp_path / "out", fmt)
    assert sorted(paths) == ["drums", "vocals"]
    for name, path in paths.items():
        assert path.name == f"{name}.{fmt.extension}"
        info = probe(path)
        assert info.codec == codec
        back = decode(path, RATE, 2, Limits(min_duration_s=0))
        n = min(back.shape[1], stems[name].shape[1])
        if fmt.is_lossless:
            assert back.shape[1] == stems[name].shape[1]
            assert snr_db(stems[name][:, :n], back[:, :n]) > min_snr
        else:
            # Lossy codecs shift by their priming delay: compare spectra, not samples.
            assert dominant_frequency(back, RATE) == pytest.approx(330.0, abs=3.0)


def test_mp3_bitrate_is_honoured(tmp_path):
    stems = {"vocals": _stems(6.0)["vocals"]}
    big = encode_stems(stems, RATE, tmp_path / "a", OutputFormat("mp3", mp3_bitrate_kbps=320))["vocals"]
    small = encode_stems(stems, RATE, tmp_path / "b", OutputFormat("mp3", mp3_bitrate_kbps=96))["vocals"]
    assert big.stat().st_size > 2.5 * small.stat().st_size


# -- clip gain ---------------------------------------------------------------------------


def test_clip_gain_is_one_when_nothing_clips():
    assert clip_gain({"a": np.full((2, 10), 0.5, np.float32)}) == 1.0


def test_clip_gain_is_shared_so_stems_still_sum_to_the_mix():
    loud = np.full((2, 100), 1.6, np.float32)
    quiet = np.full((2, 100), 0.2, np.float32)
    gain = clip_gain({"loud": loud, "quiet": quiet})
    assert gain == pytest.approx(1 / (1.6 * 1.01))
    scaled = [loud * gain, quiet * gain]
    assert max(float(np.abs(s).max()) for s in scaled) < 1.0
    # One gain for all: the ratio between stems and their sum relative to the mix hold.
    np.testing.assert_allclose(scaled[0] / scaled[1], loud / quiet, rtol=1e-6)
    np.testing.assert_allclose(sum(scaled), (loud + quiet) * gain, rtol=1e-6)


# -- limits ------------------------------------------------------------------------------


def test_too_long_is_refused_by_probe_before_decoding(tmp_path):
    path = music(tmp_path / "long.flac", seconds=5.0)
    with pytest.raises(TooLongError, match="over the 0:03 limit"):
        probe(path, Limits(max_duration_s=3.0))


def test_decode_stops_at_the_limit_when_the_container_has_no_duration(tmp_path):
    # Some containers report no duration (or a false one); decoding must still stop at
    # the limit rather than read everything.
    path = music(tmp_path / "long.wav", seconds=6.0)
    info = probe(path)
    unknown = type(info)(**{**info.__dict__, "duration_s": None})
    with pytest.raises(TooLongError):
        decode(path, RATE, 2, Limits(max_duration_s=3.0), info=unknown)


def test_too_short(tmp_path):
    with pytest.raises(TooShortError):
        probe(music(tmp_path / "blip.wav", seconds=0.4))


def test_too_large(tmp_path):
    path = music(tmp_path / "big.wav", seconds=2.0)
    with pytest.raises(TooLargeError, match="limit"):
        probe(path, Limits(max_input_bytes=10_000))


# -- bad files ---------------------------------------------------------------------------


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp3"
    path.write_bytes(b"")
    with pytest.raises(CorruptMediaError, match="empty"):
        probe(path)


def test_text_renamed_mp3(tmp_path):
    path = tmp_path / "notes.mp3"
    path.write_text("these are my lyrics, not a song\n" * 50)
    with pytest.raises((CorruptMediaError, UnsupportedMediaError)):
        decode(path, RATE, 2)


def test_image_is_not_audio(tmp_path):
    path = tmp_path / "cover.mp3"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:duration=1", "-frames:v", "1", "-f", "image2",
           "-c:v", "png", str(path))
    with pytest.raises((NotAudioError, UnsupportedMediaError)):
        probe(path)


def test_video_without_audio(tmp_path):
    path = tmp_path / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=2", "-c:v", "mpeg4", str(path))
    with pytest.raises(NotAudioError, match="no audio track"):
        probe(path)


@pytest.mark.parametrize("name,extra", [
    ("cut.mp3", ("-c:a", "libmp3lame")),
    ("cut.flac", ()),
])
def test_truncated_download_is_refused_not_separated_in_part(tmp_path, name, extra):
    path = music(tmp_path / name, seconds=20.0, extra=extra)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 5])
    with pytest.raises(CorruptMediaError, match="truncated"):
        decode(path, RATE, 2)


def test_truncated_mp4_is_refused(tmp_path):
    path = music(tmp_path / "cut.m4a", seconds=10.0, extra=("-c:a", "aac"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptMediaError):
        decode(path, RATE, 2)


def test_playlist_is_not_followed(tmp_path):
    target = music(tmp_path / "real.wav", seconds=2.0)
    playlist = tmp_path / "list.mp3"
    playlist.write_text(f"ffconcat version 1.0\nfile '{target}'\n")
    with pytest.raises((UnsupportedMediaError, CorruptMediaError)):
        decode(playlist, RATE, 2)
