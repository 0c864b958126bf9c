"""core.media.preview: a PNG of the stems' waveforms, drawn by real ffmpeg."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from core.errors import EncodeError
from core.media.audio import OutputFormat, encode_stems
from core.media.preview import BACKGROUND, STEM_COLOURS, render_preview

RATE = 44100
SECONDS = 8


def _png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height, depth, colour_type = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour_type


def _rgb_rows(data: bytes, width: int, height: int) -> np.ndarray:
    """Decode an 8-bit RGB, non-interlaced PNG (what ffmpeg writes for rgb24) into (h, w, 3)."""
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * 3
    image = np.zeros((height, stride), dtype=np.int32)
    previous = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        line = raw[y * (stride + 1):(y + 1) * (stride + 1)]
        kind, row = line[0], np.frombuffer(line[1:], dtype=np.uint8).astype(np.int32)
        out = np.zeros(stride, dtype=np.int32)
        for x in range(stride):
            left = out[x - 3] if x >= 3 else 0
            up = previous[x]
            up_left = previous[x - 3] if x >= 3 else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = left
            elif kind == 2:
                pred = up
            elif kind == 3:
                pred = (left + up) // 2
            else:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
            out[x] = (row[x] + pred) & 0xFF
        image[y] = previous = out
    return image.reshape(height, width, 3)


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    value = int(colour, 16)
    return value >> 16, (value >> 8) & 0xFF, value & 0xFF


@pytest.fixture(scope="module")
def stem_files(tmp_path_factory):
    t = np.arange(RATE * SECONDS) / RATE
    rng = np.random.default_rng(1)
    stems = {
        "vocals": 0.5 * np.sin(2 * np.pi * 330 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.25 * t)),
        "drums": 0.7 * rng.standard_normal(t.size) * np.exp(-((t * 2) % 1) * 20),
        "bass": 0.6 * np.sin(2 * np.pi * 55 * t),
        "other": 0.05 * rng.standard_normal(t.size),
    }
    stereo = {name: np.stack([a, a]).astype(np.float32) for name, a in stems.items()}
    return encode_stems(stereo, RATE, tmp_path_factory.mktemp("stems"), OutputFormat("mp3", mp3_bitrate_kbps=128))


def test_four_stems_make_a_small_stacked_png(stem_files, tmp_path):
    out = render_preview(stem_files, tmp_path / "preview.png")
    assert out == tmp_path / "preview.png"
    data = out.read_bytes()
    width, height, depth, colour_type = _png_header(data)
    assert (width, height) == (800, 4 * 70)
    assert (depth, colour_type) == (8, 2)  # 8-bit RGB, no alpha
    assert len(data) < 200_000
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]  # no partial file left

    image = _rgb_rows(data, width, height)
    background = np.array(_hex_rgb(BACKGROUND))
    for row, name in enumerate(stem_files):
        band = image[row * 70:(row + 1) * 70].reshape(-1, 3)
        colour = np.array(_hex_rgb(STEM_COLOURS[name]))
        # Each band shows its own stem's colour, on the dark background, and no other stem's.
        assert np.any(np.all(band == colour, axis=1)), name
        assert np.any(np.all(band == background, axis=1)), name
        for other in stem_files:
            if other != name:
                assert not np.any(np.all(band == np.array(_hex_rgb(STEM_COLOURS[other])), axis=1)), (name, other)


def test_custom_size_and_unknown_stem_name(stem_files, tmp_path):
    files = {"theremin": stem_files["vocals"], "bass": stem_files["bass"]}
    out = render_preview(files, tmp_path / "sub" / "p.png", width=320, row_height=40)
    assert _png_header(out.read_bytes())[:2] == (320, 80)


def test_single_stem(stem_files, tmp_path):
    out = render_preview({"vocals": stem_files["vocals"]}, tmp_path / "one.png")
    assert _png_header(out.read_bytes())[:2] == (800, 70)


def test_failure_raises_encode_error(tmp_path):
    not_audio = tmp_path / "vocals.mp3"
    not_audio.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(EncodeError):
        render_preview({"vocals": not_audio}, tmp_path / "p.png")
    with pytest.raises(EncodeError):
        render_preview({"vocals": tmp_path / "missing.mp3"}, tmp_path / "p.png")
    with pytest.raises(EncodeError):
        render_preview({}, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def _pixels(png) -> np.ndarray:
    width, height, _, _ = _png_header(png.read_bytes())
    return _rgb_rows(png.read_bytes(), width, height)


def test_a_bounded_preview_draws_the_same_picture_from_peaks(stem_files, tmp_path, monkeypatch):
    import core.media.preview

    # As many peaks per column as a 10-minute track has at the default width and PEAK_FRAMES.
    monkeypatch.setattr(core.media.preview, "PEAK_FRAMES", 16)
    direct = _pixels(render_preview(stem_files, tmp_path / "direct.png", width=200, row_height=30))
    bounded = _pixels(render_preview(stem_files, tmp_path / "bounded.png", width=200, row_height=30, bounded=True))
    assert direct.shape == bounded.shape == (120, 200, 3)
    same = np.all(direct == bounded, axis=2).mean()
    assert same > 0.98
    # Not a blank or uniform picture that would match anything.
    assert len(np.unique(direct.reshape(-1, 3), axis=0)) >= 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bounded.png", "direct.png"]  # no peaks left


def test_peaks_keep_the_loudest_sample_of_each_stretch_with_its_sign(tmp_path):
    from core.media.audio import encode_stems
    from core.media.preview import write_peaks

    audio = np.zeros((2, 4096), dtype=np.float32)
    audio[0, 10], audio[0, 20] = 0.25, -0.5     # first stretch: -0.5 is the loudest
    audio[1, 300] = 0.75                        # second stretch, right channel
    audio[0, 4095] = 0.125                      # last stretch
    path = encode_stems({"x": audio}, RATE, tmp_path, OutputFormat("wav", wav_depth="float"))["x"]
    peaks = np.fromfile(write_peaks(path, tmp_path / "x.peaks", frames=256), dtype="<f4").reshape(-1, 2)
    assert peaks.shape == (16, 2)
    assert peaks[0].tolist() == [-0.5, 0.0] and peaks[1].tolist() == [0.0, 0.75]
    assert peaks[15].tolist() == [0.125, 0.0] and not peaks[2:15].any()


def test_a_bounded_preview_of_a_broken_file_raises_encode_error(tmp_path):
    not_audio = tmp_path / "vocals.mp3"
    not_audio.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(EncodeError):
        render_preview({"vocals": not_audio}, tmp_path / "p.png", bounded=True)
    assert [p.name for p in tmp_path.iterdir()] == ["vocals.mp3"]
