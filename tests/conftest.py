"""Fixtures shared by all tests: a folder of tiny models and an empty model cache."""

from __future__ import annotations

import pytest

from tests.support import models as tiny


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A demucs-layout model folder: `tiny` (plain), `tinysum` (checksummed), and `tinybag`,
    a bag of four per-stem specialists like htdemucs_ft."""
    folder = tmp_path_factory.mktemp("models")
    tiny.save_th(tiny.tiny_htdemucs(seed=0), folder, "tiny")
    tiny.save_checksummed(tiny.tiny_htdemucs(seed=1), folder, "tinysum")
    members = []
    for k in range(4):
        sig = f"spec{k}"
        tiny.save_th(tiny.tiny_htdemucs(seed=10 + k), folder, sig)
        members.append(sig)
    identity = [[1.0 if i == k else 0.0 for i in range(4)] for k in range(4)]
    tiny.save_bag(folder, "tinybag", members, identity)
    return folder


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No HuggingFace or torch cache, and no network, as on a fresh offline host."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path
