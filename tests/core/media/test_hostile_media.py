"""Hostile and malformed media through probe + decode: each refused with the right error
(or accepted when it is really audio), within a bounded time, leaving no files behind.

The corpus is generated here. `test_fuzz_probe_and_decode` mutates small valid files
with hypothesis; it runs 25 examples per base file by default. A longer run:

    STEMBOT_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/core/media/test_hostile_media.py \
        -k fuzz -p no:cacheprovider --timeout 0
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from core.errors import (
    CorruptMediaError,
    NotAudioError,
    StembotError,
    TooLongError,
    TooShortError,
    UnsupportedMediaError,
)
from core.media import audio
from core.media.audio import Limits, decode, probe, spawn_limited
from tests.support.media import ffmpeg, music

RATE = 44100
LIMITS = Limits(min_duration_s=1.0, max_duration_s=20.0, max_input_bytes=50 * 2**20)
BOUND_S = 10.0  # per file; most take a fraction of a second
REFUSED_AS_GARBAGE = (CorruptMediaError, UnsupportedMediaError, NotAudioError)


def read_input(path: Path, limits: Limits = LIMITS) -> np.ndarray:
    """What the pipeline does with an input: probe, then decode for the model."""
    return decode(path, RATE, 2, limits, probe(path, limits))


# -- builders: each writes one file into `folder` and returns its path -----------------------


def _mp3(folder: Path, seconds=3.0, **kw) -> Path:
    return music(folder / "base.mp3", seconds=seconds, extra=("-c:a", "libmp3lame", "-b:a", "128k"), **kw)


def _truncated(folder: Path, name: str, extra: tuple, keep: float) -> Path:
    path = music(folder / name, seconds=15.0, extra=extra)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return path


def _wav_header(channels: int, rate: int, bits: int, data_bytes: int) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_bytes))


def build_empty(folder):
    (path := folder / "empty.mp3").write_bytes(b"")
    return path


def build_truncated_mp3(folder):
    return _truncated(folder, "cut.mp3", ("-c:a", "libmp3lame"), 0.4)


def build_truncated_flac(folder):
    return _truncated(folder, "cut.flac", (), 0.4)


def build_truncated_mp4(folder):
    return _truncated(folder, "cut.m4a", ("-c:a", "aac"), 0.5)


def build_header_only_wav(folder):
    (path := folder / "header.wav").write_bytes(_wav_header(2, RATE, 16, 0))
    return path


def build_zero_channel_wav(folder):
    (path := folder / "nochannels.wav").write_bytes(_wav_header(0, RATE, 16, 4000) + b"\x00" * 4000)
    return path


def build_zero_rate_wav(folder):
    (path := folder / "norate.wav").write_bytes(_wav_header(2, 0, 16, 400000) + b"\x01" * 400000)
    return path


def build_text_as_mp3(folder):
    (path := folder / "lyrics.mp3").write_text("these are my lyrics, not a song\n" * 200)
    return path


def build_html_as_mp3(folder):
    (path := folder / "page.mp3").write_text("<!DOCTYPE html><html><body>" + "<p>login</p>" * 500)
    return path


def build_png_as_mp3(folder):
    path = folder / "cover.mp3"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:duration=1", "-frames:v", "1", "-f", "image2",
           "-c:v", "png", str(path))
    return path


def build_video_only(folder):
    path = folder / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=2", "-c:v", "mpeg4", str(path))
    return path


def build_subtitles_only(folder):
    srt = folder / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:02,000\nhello\n")
    path = folder / "subs.mkv"
    ffmpeg("-i", str(srt), "-c:s", "srt", str(path))
    srt.unlink()
    return path


def build_id3_only(folder):
    (path := folder / "tagonly.mp3").write_bytes(_id3v23(b"TIT2", b"\x03title\x00"))
    return path


def _id3v23(frame_id: bytes, payload: bytes) -> bytes:
    body = frame_id + struct.pack(">I", len(payload)) + b"\x00\x00" + payload
    size = len(body)
    syncsafe = bytes([(size >> 21) & 127, (size >> 14) & 127, (size >> 7) & 127, size & 127])
    return b"ID3\x03\x00\x00" + syncsafe + body


def build_huge_id3_tag(folder):
    # A 5 MB ID3 tag in front of a real mp3: big metadata, still a song.
    tag = _id3v23(b"TXXX", b"\x03big\x00" + b"A" * (5 * 2**20))
    base = _mp3(folder)
    path = folder / "bigtag.mp3"
    path.write_bytes(tag + base.read_bytes())
    base.unlink()
    return path


def build_eight_channels(folder):
    return music(folder / "octo.wav", seconds=3.0, channels=8)


def build_192khz(folder):
    return music(folder / "hires.flac", seconds=3.0, rate=192000)


def build_wav_claiming_hours(folder):
    # The most a RIFF header can claim: 4 GiB of data, 6.7 hours at 44.1 kHz stereo.
    path = music(folder / "liar.wav", seconds=3.0, extra=("-c:a", "pcm_s16le"))
    data = bytearray(path.read_bytes())
    at = data.find(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFF00)
    data[4:8] = struct.pack("<I", 0xFFFFFFFF)
    path.write_bytes(data)
    return path


def build_mp3_header_claiming_ten_hours(folder):
    base = _mp3(folder)
    data = bytearray(base.read_bytes())
    base.unlink()
    at = data.find(b"Info") if b"Info" in data else data.find(b"Xing")
    assert at > 0, "lame wrote no Xing/Info header"
    data[at + 8:at + 12] = struct.pack(">I", 10 * 3600 * RATE // 1152)  # frame count
    (path := folder / "xing_liar.mp3").write_bytes(data)
    return path


def build_mp3_claiming_too_little(folder):
    # No Xing header, a 320 kbit/s start and a 32 kbit/s rest: ffprobe estimates the length
    # from the first bitrate (about 9 s) while 61 s are there. Decoding must stop at the limit.
    parts = []
    for name, seconds, rate in (("hi.mp3", 1.0, "320k"), ("lo.mp3", 60.0, "32k")):
        part = music(folder / name, seconds=seconds, extra=("-c:a", "libmp3lame", "-b:a", rate, "-write_xing", "0",
                                                           "-id3v2_version", "0"))
        parts.append(part.read_bytes())
        part.unlink()
    (path := folder / "vbr_liar.mp3").write_bytes(b"".join(parts))
    return path


def build_long(folder):
    return music(folder / "long.flac", seconds=25.0)


def build_m3u(folder):
    target = music(folder / "real.wav", seconds=2.0)
    (path := folder / "list.mp3").write_text(f"#EXTM3U\n#EXTINF:2,real\n{target}\nhttp://10.0.0.1/a.mp3\n")
    return path


def build_ffconcat(folder):
    target = music(folder / "real.wav", seconds=2.0)
    (path := folder / "concat.wav").write_text(
        f"ffconcat version 1.0\nfile '{target}'\nfile 'http://169.254.169.254/latest'\n")
    return path


def build_hls(folder):
    (path := folder / "stream.m4a").write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n"
        "http://127.0.0.1:9/seg0.ts\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    return path


def build_sdp(folder):
    (path := folder / "session.mp3").write_text(
        "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 5004 RTP/AVP 0\n")
    return path


def build_zip(folder):
    inner = music(folder / "inner.wav", seconds=2.0)
    path = folder / "album.mp3"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(inner, "song.wav")
    inner.unlink()
    return path


def build_random_bytes(folder):
    (path := folder / "noise.mp3").write_bytes(random.Random(1234).randbytes(200_000))
    return path


def build_zeros(folder):
    (path := folder / "zeros.wav").write_bytes(bytes(10 * 2**20))
    return path


def build_png_mp3_polyglot(folder):
    png = build_png_as_mp3(folder)
    base = _mp3(folder)
    path = folder / "polyglot.mp3"
    path.write_bytes(png.read_bytes() + base.read_bytes())
    png.unlink()
    base.unlink()
    return path


def build_wav_zip_polyglot(folder):
    # A real WAV that is also a ZIP (an archive appended after the data chunk).
    path = music(folder / "both.wav", seconds=3.0, extra=("-c:a", "pcm_s16le"))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("payload.txt", "hidden")
    return path


def build_protocol_like_name(folder):
    # Names that ffmpeg would read as a protocol or an option without the `file:` prefix.
    return music(folder / "concat:a.wav|b.wav", seconds=2.0, extra=("-f", "wav"))


def build_option_like_name(folder):
    source = music(folder / "x.wav", seconds=2.0)
    return source.rename(folder / "-i.wav")


def build_symlink_to_dev_zero(folder):
    (path := folder / "endless.wav").symlink_to("/dev/zero")
    return path


def build_fifo(folder):
    path = folder / "pipe.mp3"
    os.mkfifo(path)
    return path


def build_directory(folder):
    (path := folder / "folder.mp3").mkdir()
    return path


def build_missing(folder):
    return folder / "missing.mp3"


def build_too_short(folder):
    return music(folder / "blip.wav", seconds=0.3)


OK = "ok"
CORPUS = [
    (build_empty, CorruptMediaError),
    (build_truncated_mp3, CorruptMediaError),
    (build_truncated_flac, CorruptMediaError),
    (build_truncated_mp4, CorruptMediaError),
    (build_header_only_wav, (CorruptMediaError, TooShortError)),
    (build_zero_channel_wav, (CorruptMediaError, UnsupportedMediaError)),
    (build_zero_rate_wav, (CorruptMediaError, UnsupportedMediaError)),
    (build_text_as_mp3, REFUSED_AS_GARBAGE),
    (build_html_as_mp3, REFUSED_AS_GARBAGE),
    (build_png_as_mp3, (NotAudioError, UnsupportedMediaError)),
    (build_video_only, NotAudioError),
    (build_subtitles_only, NotAudioError),
    (build_id3_only, REFUSED_AS_GARBAGE),
    (build_m3u, REFUSED_AS_GARBAGE),
    (build_ffconcat, REFUSED_AS_GARBAGE),
    (build_hls, REFUSED_AS_GARBAGE),
    (build_sdp, REFUSED_AS_GARBAGE),
    (build_zip, REFUSED_AS_GARBAGE),
    (build_random_bytes, REFUSED_AS_GARBAGE),
    (build_zeros, REFUSED_AS_GARBAGE),
    (build_png_mp3_polyglot, (NotAudioError, UnsupportedMediaError)),
    (build_mp3_header_claiming_ten_hours, TooLongError),
    (build_mp3_claiming_too_little, TooLongError),
    (build_long, TooLongError),
    (build_too_short, TooShortError),
    (build_symlink_to_dev_zero, NotAudioError),
    (build_fifo, NotAudioError),
    (build_directory, NotAudioError),
    (build_missing, NotAudioError),
    # Legitimately audio, however odd:
    (build_eight_channels, OK),
    (build_192khz, OK),
    (build_wav_claiming_hours, OK),
    (build_huge_id3_tag, OK),
    (build_wav_zip_polyglot, OK),
    (build_protocol_like_name, OK),
    (build_option_like_name, OK),
]


@pytest.fixture
def clean_tmpdir(tmp_path, monkeypatch):
    """A private TMPDIR for ffmpeg and for us, checked to be empty afterwards."""
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setattr("tempfile.tempdir", None)
    yield private
    assert list(private.iterdir()) == []


@pytest.mark.parametrize("build,expected", CORPUS, ids=[b.__name__.removeprefix("build_") for b, _ in CORPUS])
def test_hostile_media(tmp_path, clean_tmpdir, build, expected):
    folder = tmp_path / "corpus"
    folder.mkdir()
    path = build(folder)
    before = sorted(p.name for p in folder.iterdir())
    started = time.monotonic()
    if expected == OK:
        mix = read_input(path)
        assert mix.dtype == np.float32 and mix.shape[0] == 2
        assert 1.9 < mix.shape[1] / RATE < 3.2 and np.isfinite(mix).all() and np.abs(mix).max() > 0.01
    else:
        with pytest.raises(expected) as caught:
            read_input(path)
        reason = caught.value.reason
        assert reason and "\n" not in reason and len(reason) < 160 and str(folder) not in reason
    assert time.monotonic() - started < BOUND_S
    assert sorted(p.name for p in folder.iterdir()) == before


def test_lying_mp3_is_stopped_at_the_limit_not_read_to_the_end(tmp_path):
    path = build_mp3_claiming_too_little(tmp_path)
    info = probe(path, LIMITS)
    assert info.duration_s is not None and info.duration_s < 15  # the lie got past probing
    with pytest.raises(TooLongError, match="longer than the 0:20 limit"):
        decode(path, RATE, 2, LIMITS, info)
    # Within the limit the same file decodes in full (61 s), so the stop is the cap's doing.
    assert decode(path, RATE, 2, Limits(max_duration_s=120), info).shape[1] / RATE == pytest.approx(61, abs=0.5)


# -- resource limits on ffmpeg ---------------------------------------------------------------


def _limits_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {line[:26].strip(): line[26:].split()[0] for line in lines}


@pytest.mark.parametrize("with_prlimit", [True, False], ids=["prlimit", "fallback"])
def test_ffmpeg_runs_under_cpu_and_memory_limits(monkeypatch, with_prlimit):
    if with_prlimit and audio._prlimit_command() is None:
        pytest.skip("prlimit is not available here")
    if not with_prlimit:
        monkeypatch.setattr(audio, "_prlimit_command", lambda: None)
    proc = spawn_limited(["ffmpeg", "-nostdin", "-v", "error", "-re", "-f", "lavfi", "-i", "anullsrc", "-t", "3",
                          "-f", "null", "-"], cpu_s=7, memory_bytes=3 * 2**30,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            limits = _limits_of(proc.pid)
            if limits["Max cpu time"] == "7" and Path(f"/proc/{proc.pid}/exe").resolve().name == "ffmpeg":
                break
            time.sleep(0.02)
        assert limits["Max cpu time"] == "7"
        assert limits["Max address space"] == str(3 * 2**30)
    finally:
        proc.kill()
        proc.wait()


def test_a_spinning_ffmpeg_is_killed_at_its_cpu_limit():
    started = time.monotonic()
    proc = spawn_limited(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "anoisesrc=d=100000:r=192000",
                          "-f", "null", "-"], cpu_s=1, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == -9
    assert time.monotonic() - started < 10


def test_an_address_space_limit_too_small_refuses_cleanly(tmp_path, monkeypatch):
    if audio._prlimit_command() is None:
        pytest.skip("prlimit is not available here")
    path = music(tmp_path / "fine.wav", seconds=2.0)
    assert probe(path).channels == 2
    monkeypatch.setattr(audio, "MEDIA_MEMORY_LIMIT_BYTES", 64 * 2**20)
    with pytest.raises(CorruptMediaError, match="too much memory"):
        probe(path)
    with pytest.raises(CorruptMediaError, match="too much memory"):
        decode(path, RATE, 2, info=audio.MediaInfo(1, "wav", "pcm_s16le", RATE, 2, 2.0))


# -- fuzzing ---------------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("STEMBOT_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("fuzz")
    return {
        name: music(folder / name, seconds=1.5, extra=extra).read_bytes()
        for name, extra in (("a.mp3", ("-c:a", "libmp3lame", "-b:a", "64k")), ("a.wav", ("-c:a", "pcm_s16le")),
                            ("a.flac", ()))
    }


def edits_strategy():
    """Lists of (operation, where 0..1, bytes) edits."""
    from hypothesis import strategies as st

    return st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
            st.tuples(st.just("cut"), st.floats(0, 1), st.just(b"")),
            st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
            st.tuples(st.just("bitflip"), st.floats(0, 1), st.integers(0, 7).map(lambda b: bytes([1 << b]))),
        ),
        min_size=1, max_size=12,
    )


def mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for op, where, payload in edits:
        # Most damage goes into the header, where parsers make their decisions.
        at = int(where ** 3 * max(len(buf) - 1, 0))
        if op == "set":
            buf[at:at + len(payload)] = payload
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = payload
        elif buf:
            buf[at] ^= payload[0]
    return bytes(buf)


@pytest.mark.parametrize("base", ["a.mp3", "a.wav", "a.flac"])
def test_fuzz_probe_and_decode(base, fuzz_bases, tmp_path_factory):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings

    folder = tmp_path_factory.mktemp(f"fuzz-{base}")
    target = folder / base

    @settings(max_examples=FUZZ_EXAMPLES, deadline=10_000, database=None, derandomize=FUZZ_EXAMPLES <= 25,
              suppress_health_check=[HealthCheck.too_slow])
    @given(edits=edits_strategy())
    def run(edits):
        target.write_bytes(mutate(fuzz_bases[base], edits))
        try:
            mix = read_input(target, Limits(min_duration_s=0.1, max_duration_s=20.0))
        except StembotError as exc:
            assert exc.reason and "\n" not in exc.reason
        else:
            assert mix.shape[0] == 2 and mix.dtype == np.float32 and mix.shape[1] <= 21 * RATE

    run()
    target.unlink(missing_ok=True)
    assert list(folder.iterdir()) == []
