"""`stembot separate` and `stembot models` as a user runs them: real processes, real files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.media.audio import Limits, decode, probe
from core.media.stem_files import MARKER
from tests.support.media import ffmpeg, music, snr_db

RATE = 44100


def stembot(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "stembot", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def read_wav(path: Path) -> np.ndarray:
    return decode(path, RATE, 2, Limits(min_duration_s=0))


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    return music(tmp_path_factory.mktemp("in") / "song.wav", seconds=6.0, volume=0.25,
                 extra=("-c:a", "pcm_s16le"))


def test_parity_with_the_demucs_cli(tmp_path, model_dir, song):
    ours = stembot("separate", str(song), "--out", str(tmp_path / "ours"), "--model", "tiny",
                   "--model-dir", str(model_dir), "--format", "wav", "--wav-depth", "float",
                   "--shifts", "0", "--quiet")
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run(
        [sys.executable, "-m", "demucs", "--repo", str(model_dir), "-n", "tiny", "--shifts", "0",
         "--float32", "-o", str(tmp_path / "demucs"), str(song)],
        capture_output=True, text=True, timeout=300,
    )
    assert theirs.returncode == 0, theirs.stderr
    for stem in ["drums", "bass", "other", "vocals"]:
        a = read_wav(tmp_path / "ours" / "song" / f"{stem}.wav")
        b = read_wav(tmp_path / "demucs" / "tiny" / "song" / f"{stem}.wav")
        assert a.shape == b.shape
        assert snr_db(b, a) > 40, stem


def test_bf16_precision_from_the_environment_is_close_to_fp32(tmp_path, model_dir, song):
    common = [str(song), "--model", "tiny", "--model-dir", str(model_dir), "--format", "wav",
              "--wav-depth", "float", "--shifts", "0", "--quiet"]
    exact = stembot("separate", *common, "--out", str(tmp_path / "fp32"))
    fast = stembot("separate", *common, "--out", str(tmp_path / "bf16"), env={"STEMBOT_PRECISION": "bf16"})
    assert exact.returncode == 0 and fast.returncode == 0, exact.stderr + fast.stderr
    for stem in ["drums", "bass", "other", "vocals"]:
        quality = snr_db(read_wav(tmp_path / "fp32" / "song" / f"{stem}.wav"),
                         read_wav(tmp_path / "bf16" / "song" / f"{stem}.wav"))
        assert 25 < quality < 100, (stem, quality)  # close, and bf16 did run


def test_karaoke_writes_vocals_and_instrumental(tmp_path, model_dir, song):
    done = stembot("separate", str(song), "-o", str(tmp_path), "--model", "tiny", "--model-dir",
                   str(model_dir), "--stems", "karaoke", "--format", "flac", "--quiet")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "song").iterdir()) == [MARKER, "no_vocals.flac", "vocals.flac"]
    assert "1 of 1 tracks separated" in done.stderr and "real time" in done.stderr


def test_model_dir_from_the_environment_and_opus_output(tmp_path, model_dir, song):
    done = stembot("separate", str(song), "-o", str(tmp_path), "--stems", "vocals,no_bass", "--format", "opus",
                   "--quiet", env={"STEMBOT_MODEL_DIR": str(model_dir), "STEMBOT_MODEL": "tinybag"})
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (tmp_path / "song").iterdir())
    assert files == [MARKER, "no_bass.opus", "vocals.opus"]
    assert probe(tmp_path / "song" / "vocals.opus").codec == "opus"


def test_bad_inputs_fail_one_line_each_and_leave_nothing(tmp_path, model_dir, song):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp3").write_bytes(b"")
    (bad / "lyrics.mp3").write_text("la la la\n" * 100)
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=2", "-c:v", "mpeg4", str(bad / "video.mp4"))
    cut = music(bad / "cut.flac", seconds=20.0)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    inputs = [bad / "empty.mp3", song, bad / "lyrics.mp3", bad / "video.mp4", cut, bad / "missing.wav"]
    out = tmp_path / "out"
    done = stembot("separate", *map(str, inputs), "-o", str(out), "--model", "tiny",
                   "--model-dir", str(model_dir), "--quiet")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 5, done.stderr
    by_input = {line.split(": ")[1]: line for line in errors}
    assert "empty" in by_input[str(bad / "empty.mp3")]
    assert "no audio track" in by_input[str(bad / "video.mp4")]
    assert "truncated" in by_input[str(cut)]
    assert "not found" in by_input[str(bad / "missing.wav")]
    assert "Traceback" not in done.stderr
    # The good track is there, complete; the bad ones left no folder, no staging folder.
    assert sorted(p.name for p in out.iterdir()) == ["song"]
    assert len(list((out / "song").glob("*.mp3"))) == 4


def test_same_output_name_twice_is_refused_for_the_second(tmp_path, model_dir, song):
    other = tmp_path / "elsewhere" / "song.flac"
    other.parent.mkdir()
    ffmpeg("-i", str(song), str(other))
    done = stembot("separate", str(song), str(other), "-o", str(tmp_path / "out"), "--model", "tiny",
                   "--model-dir", str(model_dir), "--quiet")
    assert done.returncode == 1
    assert f"error: {other}: output folder 'song' is already used by {song}" in done.stderr


def test_a_users_folder_named_like_the_input_is_never_replaced(tmp_path, model_dir, song):
    # `stembot separate https://x/Documents.mp3 --out ~` once replaced ~/Documents whole.
    home = tmp_path / "home"
    mine = home / "song"
    mine.mkdir(parents=True)
    (mine / "song.wav").write_bytes(song.read_bytes())
    args = ["separate", str(song), "-o", str(home), "--model", "tiny", "--model-dir", str(model_dir),
            "--stems", "karaoke", "--format", "flac", "--quiet"]
    done = stembot(*args)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["no_vocals.flac", "song.wav", "vocals.flac"]
    assert (mine / "song.wav").read_bytes() == song.read_bytes()
    stems = {name: (mine / name).read_bytes() for name in ("no_vocals.flac", "vocals.flac")}
    # A second run would have to replace files in a folder that is not stembot's: refused.
    again = stembot(*args)
    assert again.returncode == 1
    assert again.stderr.splitlines()[0] == (
        f"error: {song}: {mine} exists and was not made by stembot; choose another --out")
    assert sorted(p.name for p in home.iterdir()) == ["song"]
    assert sorted(p.name for p in mine.iterdir()) == ["no_vocals.flac", "song.wav", "vocals.flac"]
    assert (mine / "song.wav").read_bytes() == song.read_bytes()
    assert {name: (mine / name).read_bytes() for name in stems} == stems


def test_a_second_run_replaces_stembots_own_folder(tmp_path, model_dir, song):
    args = ["separate", str(song), "-o", str(tmp_path), "--model", "tiny", "--model-dir", str(model_dir),
            "--stems", "vocals", "--format", "flac", "--quiet"]
    assert stembot(*args).returncode == 0
    (tmp_path / "song" / "stale.flac").write_bytes(b"from an older run")
    done = stembot(*args)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "song").iterdir()) == [MARKER, "vocals.flac"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song"]


@pytest.mark.parametrize("args,message", [
    (["--stems", "kazoo"], "unknown stem 'kazoo'"),
    (["--format", "aiff"], "invalid choice"),
    (["--overlap", "1.5"], "--overlap"),
    (["--segment", "30"], "--segment"),
])
def test_usage_errors_exit_2(tmp_path, model_dir, song, args, message):
    done = stembot("separate", str(song), "-o", str(tmp_path), "--model", "tiny", "--model-dir",
                   str(model_dir), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert not any(tmp_path.iterdir())


def test_missing_model_fails_fast_with_how_to_provision(tmp_path, song):
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "STEMBOT_MODEL_DIR": ""}
    started = time.monotonic()
    done = stembot("separate", str(song), "-o", str(tmp_path / "out"), "--model", "htdemucs_6s", env=env)
    assert time.monotonic() - started < 20  # includes starting Python and importing torch
    assert done.returncode == 1
    assert "error: model 'htdemucs_6s' is not available offline" in done.stderr
    assert "stembot models pull htdemucs_6s" in done.stderr
    assert not (tmp_path / "out").exists()


def test_models_list_and_pull_offline(tmp_path, model_dir):
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    listing = stembot("models", "list", "--model-dir", str(model_dir), env=env)
    assert listing.returncode == 0
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert "model folder" in lines["tinybag"]
    assert "stembot models pull htdemucs_ft" in lines["htdemucs_ft"]
    pulled = stembot("models", "pull", "htdemucs", env=env)
    assert pulled.returncode == 1 and "unreachable" in pulled.stderr


def test_backend_from_the_option_or_the_environment_gives_torchs_stems(tmp_path, model_dir, song):
    common = [str(song), "--model", "tiny", "--model-dir", str(model_dir), "--format", "wav",
              "--wav-depth", "float", "--shifts", "0", "--quiet"]
    exports = {"STEMBOT_EXPORT_DIR": str(tmp_path / "exports")}
    torch_run = stembot("separate", *common, "--out", str(tmp_path / "torch"), "--backend", "torch", env=exports)
    onnx_run = stembot("separate", *common, "--out", str(tmp_path / "onnx"), "--backend", "onnx", env=exports)
    assert torch_run.returncode == 0 and onnx_run.returncode == 0, torch_run.stderr + onnx_run.stderr
    assert not list((tmp_path / "exports").glob("*.onnx.tmp"))
    [export] = (tmp_path / "exports").glob("*.onnx")  # the onnx run did run the export
    openvino_run = stembot("separate", *common, "--out", str(tmp_path / "openvino"),
                           env={**exports, "STEMBOT_BACKEND": "openvino"})
    assert openvino_run.returncode == 0, openvino_run.stderr
    assert list((tmp_path / "exports").glob("*.onnx")) == [export]  # one export serves both runtimes
    for stem in ["drums", "bass", "other", "vocals"]:
        reference = read_wav(tmp_path / "torch" / "song" / f"{stem}.wav")
        for backend in ("onnx", "openvino"):
            assert snr_db(reference, read_wav(tmp_path / backend / "song" / f"{stem}.wav")) > 60, (stem, backend)
    bad = stembot("separate", *common, "--out", str(tmp_path / "bad"), "--backend", "tensorflow")
    assert bad.returncode == 2 and "--backend" in bad.stderr


def test_separate_runs_without_loading_the_bots_database_queue_or_storage(tmp_path, model_dir, song):
    # The real command, then a look at what its process loaded: the bot's database (SQLAlchemy,
    # Alembic), queue (procrastinate), storage (boto) and Discord are start-up time it does not use.
    bots_parts = ("sqlalchemy", "alembic", "procrastinate", "botocore", "discord", "core.db", "core.runtime")
    driver = ("import sys\nfrom stembot.cli import main\ncode = main(sys.argv[1:])\n"
              f"print([name for name in {bots_parts!r} if name in sys.modules])\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", driver, "separate", str(song), "--out", str(tmp_path), "--model",
                           "tiny", "--model-dir", str(model_dir), "--shifts", "0", "--format", "wav", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "song" / "vocals.wav").exists()
    assert done.stdout.strip().splitlines()[-1] == "[]"
