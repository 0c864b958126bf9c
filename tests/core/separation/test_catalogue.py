"""core.separation.catalogue: demucs's real loaders, from a model folder, the HF cache, the torch cache;
and a fast, clear failure when a model is nowhere to be found offline."""

from __future__ import annotations

import time

import pytest

from core.errors import ModelUnavailableError
from core.separation import catalogue
from tests.support import models as tiny


@pytest.fixture
def no_network(monkeypatch):
    """Point the hub at a closed loopback port: refused at once, on any machine."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_loads_plain_checksummed_and_bag_from_model_dir(model_dir):
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs

    assert isinstance(catalogue.load("tiny", model_dir), HTDemucs)
    assert isinstance(catalogue.load("tinysum", model_dir), HTDemucs)
    bag = catalogue.load("tinybag", model_dir)
    assert isinstance(bag, BagOfModels) and len(bag.models) == 4
    assert catalogue.locate("tiny", model_dir).source == "model-dir"


def test_corrupted_checksummed_file_is_a_clear_error(tmp_path):
    path = tiny.save_checksummed(tiny.tiny_htdemucs(), tmp_path, "broken")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailableError, match="'broken' could not be loaded.*checksum"):
        catalogue.load("broken", tmp_path)


def test_unknown_model_names_what_exists(model_dir, empty_caches, no_network):
    with pytest.raises(ModelUnavailableError) as info:
        catalogue.locate("nosuchmodel", model_dir)
    reason = info.value.reason
    assert "unknown model 'nosuchmodel'" in reason
    assert "tinybag" in reason and "htdemucs_ft" in reason


def test_missing_official_model_fails_fast_and_says_how_to_provision(empty_caches, no_network):
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        catalogue.load("htdemucs", None)
    elapsed = time.monotonic() - started
    reason = info.value.reason
    assert elapsed < 3.0, f"took {elapsed:.1f} s; demucs alone retries for ~24 s"
    assert "'htdemucs' is not available offline" in reason
    assert "HuggingFace cache" in reason and str(empty_caches) in reason
    assert "stembot models pull htdemucs" in reason and "STEMBOT_MODEL_DIR" in reason


def test_offline_mode_skips_the_network_probe(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="offline mode"):
        catalogue.locate("htdemucs_ft", None)


def test_official_model_from_a_prefilled_huggingface_cache(empty_caches, no_network):
    # htdemucs is one model, signature 955717e8; lay it out as `stembot models pull` leaves it.
    tiny.fill_hf_cache(empty_caches / "hf" / "hub", "htdemucs", "adefossez/HTDemucs",
                       {"955717e8": tiny.tiny_htdemucs(seed=3)})
    location = catalogue.locate("htdemucs", None)
    assert location.source == "hf-cache"
    model = catalogue.load("htdemucs", None)
    assert model.sources == tiny.SOURCES and len(model.models) == 1
    entries = {e.name: e.available for e in catalogue.list_models(None)}
    assert entries["htdemucs"] == "HuggingFace cache" and entries["htdemucs_ft"] == ""


def test_official_model_from_torch_hub_checkpoints(empty_caches, no_network):
    tiny.save_th(tiny.tiny_htdemucs(seed=4), empty_caches / "torch" / "hub" / "checkpoints", "955717e8")
    assert catalogue.locate("htdemucs", None).source == "torch-cache"
    assert catalogue.load("htdemucs", None).sources == tiny.SOURCES


def test_official_model_list_comes_from_demucs():
    names = catalogue.official_models()
    assert {"htdemucs", "htdemucs_ft", "htdemucs_6s"} <= set(names)


def test_a_checkpoint_in_the_model_folder_is_found_and_listed_not_taken_for_a_bag(model_dir):
    assert catalogue.locate("tinyroformer", model_dir).source == "model-dir"
    assert "tinyroformer" not in catalogue._local_repo_names(model_dir)  # its YAML is no demucs bag
    entries = {entry.name: entry.available for entry in catalogue.list_models(model_dir)}
    assert entries["tinyroformer"] == f"model folder {model_dir}"
    # Listed checkpoints that are not here: known, not available.
    assert entries["model_bs_roformer_ep_317_sdr_12.9755"] == ""


def test_a_listed_checkpoint_not_in_the_folder_fails_fast_and_says_how_to_pull_it(model_dir, empty_caches, no_network):
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        catalogue.load("MDX23C-8KFFT-InstVoc_HQ", model_dir)
    assert time.monotonic() - started < 1.0  # no network probe: it is only ever in the model folder
    reason = info.value.reason
    assert "'MDX23C-8KFFT-InstVoc_HQ' is not available offline" in reason
    assert "stembot models pull MDX23C-8KFFT-InstVoc_HQ" in reason
    assert "MDX23C-8KFFT-InstVoc_HQ.ckpt and MDX23C-8KFFT-InstVoc_HQ.yaml" in reason
    assert f"model folder {model_dir} (has: " in reason and "tinyroformer" in reason
