"""core.media.render: tempo and transpose through ffmpeg's rubberband filter (measured on the
encoded files with numpy's FFT), the options' text and checks, and mixing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import BadRequestError
from core.media.audio import OutputFormat, decode, probe
from core.media.render import LIMIT, RenderOptions, mix_files, mix_stems, parse_volumes
from core.media.stem_files import write_track

RATE = 44100
SECONDS = 4.0


def tone(hz: float = 440.0, amplitude: float = 0.5, seconds: float = SECONDS) -> np.ndarray:
    """A stereo sine, channels x samples."""
    t = np.arange(int(RATE * seconds)) / RATE
    wave = (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.stack([wave, wave])


def rendered(tmp_path: Path, audio: np.ndarray, options: RenderOptions, fmt: str = "wav") -> np.ndarray:
    """`audio` written as a job's stem is (write_track, through the options' filters), decoded."""
    folder = write_track({"x": audio}, RATE, tmp_path, "out", OutputFormat(name=fmt, wav_depth="float"),
                         options.audio_filters())
    return decode(folder / f"x.{OutputFormat(name=fmt).extension}", RATE, 2)


def frequency(audio: np.ndarray) -> float:
    """The strongest frequency of the first channel."""
    wave = audio[0]
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.argmax(spectrum) * RATE / wave.size)


def test_80_percent_tempo_keeps_the_pitch_and_makes_it_1_25_times_as_long(tmp_path):
    out = rendered(tmp_path, tone(440.0), RenderOptions(tempo=80))
    assert out.shape[1] / RATE == pytest.approx(SECONDS / 0.8, rel=0.01)
    assert frequency(out) == pytest.approx(440.0, rel=0.01)


def test_150_percent_tempo_in_mp3_is_two_thirds_as_long(tmp_path):
    folder = write_track({"x": tone()}, RATE, tmp_path, "out", OutputFormat(name="mp3"),
                         RenderOptions(tempo=150).audio_filters())
    # mp3 pads a frame or two: the length the results check accepts.
    assert probe(folder / "x.mp3").duration_s == pytest.approx(SECONDS / 1.5, abs=0.1)


def test_transpose_12_doubles_the_frequency_and_keeps_the_length(tmp_path):
    out = rendered(tmp_path, tone(440.0), RenderOptions(transpose=12))
    assert frequency(out) == pytest.approx(880.0, rel=0.015)
    assert out.shape[1] / RATE == pytest.approx(SECONDS, rel=0.02)


def test_transpose_down_and_slower_at_once(tmp_path):
    out = rendered(tmp_path, tone(440.0), RenderOptions(tempo=50, transpose=-12))
    assert frequency(out) == pytest.approx(220.0, rel=0.015)
    assert out.shape[1] / RATE == pytest.approx(2 * SECONDS, rel=0.01)


def test_a_loud_stem_shifted_never_goes_over_full_scale(tmp_path):
    """rubberband overshoots a tone's peak by about a third at an octave up; the limiter
    after it keeps the samples at LIMIT."""
    out = rendered(tmp_path, tone(440.0, amplitude=0.95), RenderOptions(transpose=12))
    assert float(np.max(np.abs(out))) <= LIMIT + 1e-3
    # and it limits, not attenuates: the level in the middle is about the original's
    middle = out[:, RATE:2 * RATE]
    assert float(np.sqrt(np.mean(middle ** 2))) == pytest.approx(0.95 / np.sqrt(2), rel=0.15)


def test_plain_options_render_nothing_and_leave_the_samples_alone(tmp_path):
    assert RenderOptions().audio_filters() == () and RenderOptions().plain
    audio = tone(440.0)
    out = rendered(tmp_path, audio, RenderOptions())
    assert np.allclose(out, audio, atol=1e-6)


# -- the options as text ------------------------------------------------------------------


def test_the_column_text_is_canonical_and_reads_back():
    options = RenderOptions(tempo=80, transpose=-2, mix=(("vocals", 50), ("bass", 100)))
    assert RenderOptions.from_column(options.to_column()) == options
    assert RenderOptions(tempo=80).to_column() == '{"tempo":80}'
    assert RenderOptions().to_column() == "" and RenderOptions.from_column("") == RenderOptions()
    assert RenderOptions.from_column(None) == RenderOptions()
    # equal options, equal text: the results cache compares it
    assert RenderOptions(transpose=3, tempo=90).to_column() == RenderOptions(tempo=90, transpose=3).to_column()


@pytest.mark.parametrize("text", ['{"tempo": 300}', '{"tempo": "80"}', '{"speed": 80}', "[1]", "not json",
                                  '{"mix": [["../x", 100]]}', '{"mix": []}', '{"mix": [["vocals", 900]]}',
                                  '{"mix": [["vocals", 50], ["vocals", 60]]}'])
def test_a_column_that_is_not_options_is_refused(text):
    with pytest.raises(BadRequestError):
        RenderOptions.from_column(text)


def test_the_result_says_speed_and_semitones():
    assert RenderOptions(tempo=80, transpose=2).describe() == "at 80% speed, +2 semitones"
    assert RenderOptions(transpose=-1).describe() == "-1 semitone"
    assert RenderOptions().describe() == ""
    assert RenderOptions(mix=(("vocals", 50), ("bass", 100))).describe_mix() == "vocals 50%, bass"


@pytest.mark.parametrize(("field", "value", "words"), [
    ("tempo", 49, "from 50 to 150"), ("tempo", 151, "from 50 to 150"), ("tempo", 0, "from 50 to 150"),
    ("transpose", 13, "from -12 to +12"), ("transpose", -13, "from -12 to +12"),
])
def test_out_of_range_is_refused_in_words(field, value, words):
    with pytest.raises(BadRequestError) as caught:
        RenderOptions(**{field: value})
    assert words in caught.value.reason


def test_volumes_are_parsed_in_several_spellings():
    assert parse_volumes("vocals=50 bass=100") == {"vocals": 50, "bass": 100}
    assert parse_volumes("Vocals: 0%, drums=200") == {"vocals": 0, "drums": 200}
    assert parse_volumes("") == {} and parse_volumes(None) == {}


@pytest.mark.parametrize(("text", "words"), [
    ("vocals", "written like"), ("vocals=loud", "written like"), ("vocals=201", "from 0 to 200"),
    ("vocals=-5", "from 0 to 200"), ("vocals=50 vocals=60", "twice"), ("<@123>=5", "written like"),
])
def test_malformed_volumes_are_refused_in_words(text, words):
    with pytest.raises(BadRequestError) as caught:
        parse_volumes(text)
    assert words in caught.value.reason
    assert "<@" not in caught.value.reason  # nothing typed is quoted back as a mention


# -- mixing -------------------------------------------------------------------------------


def test_a_mix_sums_the_chosen_stems_at_their_volumes():
    stems = {"vocals": tone(440.0, 0.2), "bass": tone(110.0, 0.2), "drums": tone(60.0, 0.2)}
    out = mix_stems(stems, (("vocals", 50), ("bass", 100)))
    assert np.allclose(out, 0.5 * stems["vocals"] + stems["bass"], atol=1e-6)


def test_a_loud_mix_gets_the_anti_clip_gain_instead_of_clipping():
    stems = {"a": tone(440.0, 0.8), "b": tone(440.0, 0.8)}
    out = mix_stems(stems, (("a", 100), ("b", 100)))
    assert float(np.max(np.abs(out))) <= 1.0
    assert np.allclose(out / float(np.max(np.abs(out))), stems["a"] / 0.8, atol=1e-4)  # scaled, not clipped


def test_a_mix_of_stems_on_disk_is_the_mix_of_the_same_stems_in_memory(tmp_path):
    stems = {"vocals": tone(440.0, 0.7, 3.0), "bass": tone(110.0, 0.7, 3.0)}
    paths = {}
    for name, audio in stems.items():
        paths[name] = tmp_path / f"{name}.f32"
        np.ascontiguousarray(audio.T, dtype="<f4").tofile(paths[name])
    mix = (("vocals", 150), ("bass", 100))
    peak = mix_files(paths, mix, tmp_path / "mix.f32", channels=2, sample_rate=RATE, chunk_s=0.7)
    on_disk = np.fromfile(tmp_path / "mix.f32", dtype="<f4").reshape(-1, 2).T
    summed = 1.5 * stems["vocals"] + stems["bass"]
    assert np.allclose(on_disk, summed, atol=1e-5)
    assert peak == pytest.approx(float(np.max(np.abs(summed))), rel=1e-5)
    # the gain, applied as the mix is encoded, is the one mix_stems applies in memory
    assert np.allclose(mix_stems(stems, mix), summed / (peak * 1.01), atol=1e-5)
