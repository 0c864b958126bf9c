"""`stembot separate` and `stembot models` with community checkpoints (#16), as an operator runs
them: real processes, a real model folder (a tiny BS-RoFormer beside tiny Demucs models), and
`models pull` from a mirror on loopback (STEMBOT_MODEL_MIRROR_URL), as an operator points one."""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from core.separation.published import BY_NAME
from tests.stembot.test_cli import read_wav, stembot
from tests.support import checkpoints
from tests.support.media import music, snr_db

LISTED = "model_bs_roformer_ep_317_sdr_12.9755"  # viperx's BS-RoFormer, published without a digest
PINNED = "vocals_mel_band_roformer"  # Kimberley Jensen's, with a published sha256


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    return music(tmp_path_factory.mktemp("in") / "song.wav", seconds=6.0, volume=0.25, extra=("-c:a", "pcm_f32le"))


@pytest.fixture
def mirror(tmp_path):
    """A folder served over HTTP on loopback; yields (folder, url)."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/models"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _QuietHandler(SimpleHTTPRequestHandler):
    def translate_path(self, path: str) -> str:
        return super().translate_path(path.removeprefix("/models"))

    def log_message(self, *args: object) -> None:
        pass


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
            "HF_ENDPOINT": "http://127.0.0.1:9", **extra}


def test_separate_with_a_checkpoint_beside_demucs_models(tmp_path, model_dir, song):
    done = stembot("separate", str(song), "-o", str(tmp_path / "out"), "--model", "tinyroformer",
                   "--model-dir", str(model_dir), "--format", "wav", "--wav-depth", "float",
                   env=offline_env(tmp_path))
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "out" / "song"
    stems = {path.stem: read_wav(path) for path in folder.glob("*.wav")}
    assert set(stems) == {"vocals", "instrumental"}
    mix = read_wav(song)
    # The target model's residual: the stems sum back to the mix.
    assert snr_db(mix, stems["vocals"] + stems["instrumental"]) > 60.0
    assert not np.allclose(stems["vocals"], 0.0)

    karaoke = stembot("separate", str(song), "-o", str(tmp_path / "karaoke"), "--model", "tinyroformer",
                      "--model-dir", str(model_dir), "--stems", "karaoke", env=offline_env(tmp_path))
    assert karaoke.returncode == 0, karaoke.stderr
    assert {p.stem for p in (tmp_path / "karaoke" / "song").glob("*.mp3")} == {"vocals", "no_vocals"}


def test_models_list_shows_what_can_be_pulled_and_what_the_folder_holds(tmp_path, model_dir):
    listing = stembot("models", "list", "--model-dir", str(model_dir), env=offline_env(tmp_path))
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert "model folder" in lines["tinyroformer"] and "vocals,instrumental" in lines["tinyroformer"]
    assert "model folder" in lines["tiny"]
    for model in BY_NAME.values():
        if model.family == "demucs":
            continue
        line = lines[model.name]
        assert ",".join(model.stems) in line and model.speed in line and model.license in line
        assert f"stembot models pull {model.name}" in line


def test_pull_fetches_a_listed_checkpoint_from_the_mirror_and_it_separates(tmp_path, mirror, song):
    served, url = mirror
    checkpoints.save_checkpoint(served, LISTED, checkpoints.bs_roformer_config())
    models = tmp_path / "models"
    env = offline_env(tmp_path, STEMBOT_MODEL_MIRROR_URL=url, STEMBOT_MODEL_DIR=str(models))

    missing = stembot("separate", str(song), "-o", str(tmp_path / "out"), "--model", LISTED, env=env)
    assert missing.returncode == 1
    assert f"model '{LISTED}' is not available offline" in missing.stderr
    assert f"stembot models pull {LISTED}" in missing.stderr

    pulled = stembot("models", "pull", LISTED, env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert sorted(p.name for p in models.iterdir()) == [f"{LISTED}.ckpt", f"{LISTED}.yaml"]
    assert (models / f"{LISTED}.ckpt").read_bytes() == (served / f"{LISTED}.ckpt").read_bytes()

    done = stembot("separate", str(song), "-o", str(tmp_path / "out"), "--model", LISTED, env=env)
    assert done.returncode == 0, done.stderr
    assert {p.stem for p in (tmp_path / "out" / "song").glob("*.mp3")} == {"vocals", "instrumental"}


def test_pull_refuses_a_file_that_does_not_match_its_digest_and_leaves_nothing(tmp_path, mirror):
    served, url = mirror
    checkpoints.save_checkpoint(served, PINNED, checkpoints.mel_band_roformer_config())
    digest = dict(BY_NAME[PINNED].sha256)[f"{PINNED}.ckpt"]
    assert hashlib.sha256((served / f"{PINNED}.ckpt").read_bytes()).hexdigest() != digest
    models = tmp_path / "models"
    pulled = stembot("models", "pull", PINNED, "--model-dir", str(models),
                     env=offline_env(tmp_path, STEMBOT_MODEL_MIRROR_URL=url))
    assert pulled.returncode == 1
    assert f"{PINNED}.ckpt" in pulled.stderr and "does not match its published sha256" in pulled.stderr
    assert not any(p.name.endswith(".ckpt") for p in models.iterdir())  # nor a partial file


def test_pull_refuses_a_file_over_the_cap_and_an_unreachable_mirror_fails_fast(tmp_path, mirror):
    served, url = mirror
    checkpoints.save_checkpoint(served, LISTED, checkpoints.bs_roformer_config())
    with open(served / f"{LISTED}.ckpt", "ab") as file:
        file.write(b"\0" * (2 << 20))  # past a 1 MB cap
    models = tmp_path / "models"
    capped = stembot("models", "pull", LISTED, "--model-dir", str(models),
                     env=offline_env(tmp_path, STEMBOT_MODEL_MIRROR_URL=url, STEMBOT_MODEL_MAX_DOWNLOAD_MB="1"))
    assert capped.returncode == 1 and "cap" in capped.stderr
    assert not (models / f"{LISTED}.ckpt").exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []

    shutil.rmtree(models)
    offline = stembot("models", "pull", LISTED, "--model-dir", str(models),
                      env=offline_env(tmp_path, STEMBOT_MODEL_MIRROR_URL="http://127.0.0.1:9/models"))
    assert offline.returncode == 1
    assert f"model '{LISTED}'" in offline.stderr and "could not be downloaded" in offline.stderr
    assert "STEMBOT_MODEL_MIRROR_URL" in offline.stderr
