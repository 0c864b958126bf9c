"""Parity: stembot's checkpoint engine against python-audio-separator's own separation path.

For each family a tiny checkpoint is built with audio-separator's classes (random weights) and
saved with its YAML in a model folder beside a tiny Demucs model; stembot loads it through its
real loading code (`SeparationEngine.load`), and both separate the same decoded audio file:
stembot chunk by chunk, audio-separator with `MDXCSeparator.demix` at the YAML's own chunk
and overlap settings. The stems must agree within 40 dB SNR (they agree to float rounding).
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from core.media.audio import Limits, decode
from core.separation.checkpoint_engine import CheckpointEngine
from core.separation.checkpoint_models import describe, stem_name
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import StemRequest
from tests.support import checkpoints
from tests.support import models as tiny
from tests.support.media import music, snr_db

FAMILIES = {
    "bs_roformer": checkpoints.bs_roformer_config,
    "mel_band_roformer": checkpoints.mel_band_roformer_config,
    "mdx23c": checkpoints.mdx23c_config,
}


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return music(tmp_path_factory.mktemp("in") / "song.flac", seconds=6.0, volume=0.4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder: a tiny Demucs model and one tiny checkpoint per family."""
    folder = tmp_path_factory.mktemp("models")
    tiny.save_th(tiny.tiny_htdemucs(seed=0), folder, "tiny")
    for seed, (family, config) in enumerate(FAMILIES.items()):
        checkpoints.save_checkpoint(folder, f"tiny_{family}", config(), seed=seed)
    return folder


def reference(folder, name: str, mix: np.ndarray) -> dict[str, np.ndarray]:
    """audio-separator's own demix of `mix` with the checkpoint `name`, stems by stembot's names."""
    from audio_separator.separator.architectures.mdxc_separator import MDXCSeparator

    checkpoint = describe(name, folder)
    cpu = torch.device("cpu")
    common = {
        "logger": logging.getLogger("audio_separator"), "log_level": logging.WARNING, "torch_device": cpu,
        "torch_device_cpu": cpu, "torch_device_mps": None, "onnx_execution_provider": None,
        "model_name": name, "model_path": str(checkpoint.weights), "model_data": checkpoint.config,
        "output_dir": str(folder), "output_format": "flac", "normalization_threshold": 0.9,
        "amplification_threshold": 0.0, "enable_denoise": False, "output_single_stem": None,
        "invert_using_spec": False, "sample_rate": checkpoint.samplerate, "use_soundfile": True,
    }
    # The YAML's chunk (inference.dim_t) and overlap (inference.num_overlap), as its own CLI uses them.
    arch = {"segment_size": 256, "override_model_segment_size": False, "overlap": None, "batch_size": None,
            "pitch_shift": 0}
    separator = MDXCSeparator(common, arch)
    sources = separator.demix(mix.copy(), override_model_segment_size=False)
    return {stem_name(key): value for key, value in sources.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_matches_audio_separator(folder, song, family):
    name = f"tiny_{family}"
    engine = SeparationEngine.load(name, folder, "cpu")
    assert isinstance(engine, CheckpointEngine) and engine.checkpoint.family == family
    mix = decode(song, engine.samplerate, engine.audio_channels, Limits())
    ours = engine.separate(mix, StemRequest(tuple(engine.sources)), SeparationOptions(shifts=0))
    theirs = reference(folder, name, mix)
    assert set(ours) == set(theirs) == set(engine.sources)
    for stem, expected in theirs.items():
        assert ours[stem].shape == mix.shape
        assert snr_db(expected, ours[stem]) >= 40.0, stem
    assert not np.allclose(ours[engine.sources[0]], 0.0)  # a network ran, not a pass-through of silence


def test_a_target_model_sums_back_to_the_mix_and_karaoke_is_the_residual(folder, song):
    engine = SeparationEngine.load("tiny_bs_roformer", folder, "cpu")
    assert engine.sources == ["vocals", "instrumental"]
    mix = decode(song, engine.samplerate, engine.audio_channels, Limits())
    stems = engine.separate(mix, StemRequest(("vocals", "instrumental", "no_vocals")), SeparationOptions(shifts=0))
    np.testing.assert_allclose(stems["vocals"] + stems["instrumental"], mix, atol=1e-5)
    np.testing.assert_array_equal(stems["no_vocals"], stems["instrumental"])


def test_a_config_of_an_unknown_family_is_a_clear_error(folder, tmp_path):
    from core.errors import ModelUnavailableError

    shutil.copy(folder / "tiny_mdx23c.ckpt", tmp_path / "scnetlike.ckpt")
    (tmp_path / "scnetlike.yaml").write_text("model:\n  dims: [4, 32]\ntraining:\n  instruments: [vocals, other]\n")
    with pytest.raises(ModelUnavailableError, match="'scnetlike'.*unknown family.*BS-RoFormer"):
        SeparationEngine.load("scnetlike", tmp_path, "cpu")
