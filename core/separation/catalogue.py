"""Finding and loading Demucs models, through demucs's own loading code.

demucs alone spends about 24 s retrying the network before it admits a model is not
there. Stembot decides up front where a model comes from, in this order:

1. the local model folder (`--model-dir` / `STEMBOT_MODEL_DIR`), in demucs's repo layout, or a
   community checkpoint there (`NAME.ckpt` + `NAME.yaml`, core/separation/checkpoint_models.py);
2. the HuggingFace cache (what `stembot models pull` fills);
3. torch's hub cache of legacy `.th` checkpoints;
4. the network, only when the hub answers within a second or two and offline mode is off.

When none has it, `ModelUnavailableError` names the model, the places looked at, and
how to provision it. A listed checkpoint (core/separation/published.py) is only ever in the
model folder: `stembot models pull NAME` downloads its files there.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import yaml

from core.errors import ModelUnavailableError
from core.separation import checkpoint_models, model_download
from core.separation.published import BY_NAME, PUBLISHED

if TYPE_CHECKING:
    from demucs.repo import AnyModel

log = logging.getLogger(__name__)

NETWORK_PROBE_TIMEOUT_S = 1.5


def _demucs_remote_root() -> Path:
    from demucs.pretrained import REMOTE_ROOT  # noqa: PLC0415 - demucs loads only when a model runs

    return Path(REMOTE_ROOT)


def official_models() -> list[str]:
    """Names of the pretrained models demucs knows (htdemucs, htdemucs_ft, ...)."""
    return sorted(p.stem for p in _demucs_remote_root().glob("*.yaml"))


def _official_bag(name: str) -> dict:
    with open(_demucs_remote_root() / f"{name}.yaml") as file:
        return yaml.safe_load(file)


@dataclass(frozen=True)
class ModelLocation:
    """Where a model will be loaded from."""

    name: str
    source: str  # "model-dir", "hf-cache", "torch-cache", "network"
    detail: str


# -- where to look -----------------------------------------------------------------


def _local_repo_names(model_dir: Path) -> set[str]:
    """What demucs's LocalRepo/BagOnlyRepo would find in `model_dir`."""
    from demucs.repo import BagOnlyRepo, LocalRepo  # noqa: PLC0415 - demucs loads only when a model runs

    repo = LocalRepo(model_dir)
    names = set(repo.list_model()) | set(BagOnlyRepo(model_dir, repo).list_model())
    # A checkpoint's NAME.yaml is its config, not a demucs bag.
    return names - set(checkpoint_models.checkpoint_names(model_dir))


def _is_listed_checkpoint(name: str) -> bool:
    return name in BY_NAME and BY_NAME[name].family != "demucs"


def _hf_repo_id(name: str) -> str:
    from demucs.hf import DEFAULT_NAMESPACE, hf_repo_name  # noqa: PLC0415 - demucs loads only when a model runs

    namespace, _, bare = name.rpartition("/")
    return f"{namespace or DEFAULT_NAMESPACE}/{hf_repo_name(bare)}"


def _hf_cached_files(name: str) -> tuple[Path, list[Path]] | None:
    """The cached bag yaml and safetensors of `name`, or None when any is missing."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 - the bot imports this module for the model list

    repo_id = _hf_repo_id(name)
    bare = name.rpartition("/")[2]
    yaml_path = try_to_load_from_cache(repo_id, f"{bare}.yaml")
    if not isinstance(yaml_path, str):
        return None
    with open(yaml_path) as file:
        bag = yaml.safe_load(file)
    weights = []
    for sig in bag["models"]:
        path = try_to_load_from_cache(repo_id, f"{sig}.safetensors")
        if not isinstance(path, str):
            return None
        weights.append(Path(path))
    return Path(yaml_path), weights


def _torch_checkpoints_dir() -> Path:
    import torch.hub  # noqa: PLC0415 - torch: the bot imports this module for the model list

    return Path(torch.hub.get_dir()) / "checkpoints"


def _torch_cached_files(name: str) -> list[Path] | None:
    if name not in official_models():
        return None
    folder = _torch_checkpoints_dir()
    if not folder.is_dir():
        return None
    files = []
    for sig in _official_bag(name)["models"]:
        matches = sorted(folder.glob(f"{sig}-*.th")) or sorted(folder.glob(f"{sig}.th"))
        if not matches:
            return None
        files.append(matches[0])
    return files


def _hub_reachable() -> tuple[bool, str]:
    """Whether the HuggingFace hub answers quickly; never waits more than a second or two."""
    from huggingface_hub import constants  # noqa: PLC0415 - the bot imports this module for the model list

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False, "offline mode (HF_HUB_OFFLINE) is on"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=NETWORK_PROBE_TIMEOUT_S):
            return True, f"{host} reachable"
    except OSError as exc:
        return False, f"{host} unreachable ({exc.__class__.__name__})"


def locate(name: str, model_dir: Path | None = None) -> ModelLocation:
    """Decide where `name` loads from, or raise ModelUnavailableError within ~2 s."""
    looked: list[str] = []
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            looked.append(f"model folder {model_dir} (does not exist)")
        else:
            names = _local_repo_names(model_dir) | set(checkpoint_models.checkpoint_names(model_dir))
            if name in names:
                return ModelLocation(name, "model-dir", str(model_dir))
            looked.append(f"model folder {model_dir} (has: {', '.join(sorted(names)) or 'nothing'})")
    else:
        looked.append("model folder (not set)")

    if _is_listed_checkpoint(name):
        files = " and ".join(file_name for file_name, _ in BY_NAME[name].files)
        raise ModelUnavailableError(
            f"model '{name}' is not available offline. Looked in: {'; '.join(looked)}. To provision it, run "
            f"`stembot models pull {name}` (it downloads {files} into the model folder), or copy those files "
            "into the folder that --model-dir / STEMBOT_MODEL_DIR names."
        )
    from huggingface_hub import constants  # noqa: PLC0415 - the bot imports this module for the model list

    official = name in official_models() or "/" in name
    if official:
        cached = _hf_cached_files(name)
        if cached is not None:
            return ModelLocation(name, "hf-cache", str(cached[0].parent))
        looked.append(f"HuggingFace cache {constants.HF_HUB_CACHE}")
        checkpoints = _torch_cached_files(name)
        if checkpoints is not None:
            return ModelLocation(name, "torch-cache", str(checkpoints[0].parent))
        looked.append(f"torch hub cache {_torch_checkpoints_dir()}")
        reachable, why = _hub_reachable()
        if reachable:
            return ModelLocation(name, "network", constants.ENDPOINT)
        looked.append(f"network: {why}")
        raise ModelUnavailableError(
            f"model '{name}' is not available offline. Looked in: {'; '.join(looked)}. "
            f"To provision it, run `stembot models pull {name}` on a machine with internet "
            "access (it fills the HuggingFace cache, which can be copied or mounted), or put "
            "its files in a folder and point --model-dir / STEMBOT_MODEL_DIR at it."
        )
    local = _local_repo_names(model_dir) if model_dir and model_dir.is_dir() else set()
    local |= set(checkpoint_models.checkpoint_names(model_dir))
    known = sorted(set(official_models()) | local | {model.name for model in PUBLISHED})
    raise ModelUnavailableError(
        f"unknown model '{name}'. Looked in: {'; '.join(looked)}. Known models: {', '.join(known)}."
    )


# -- loading -----------------------------------------------------------------------


def load(name: str, model_dir: Path | None = None) -> AnyModel:
    """Load `name` with demucs's loading code from the place `locate` picks. Returns a
    demucs model or BagOfModels in eval mode, on the CPU."""
    location = locate(name, model_dir)
    started = time.monotonic()
    try:
        model = _load_from(location, model_dir)
    except ModelUnavailableError:
        raise
    except Exception as exc:  # a broken or incompatible file: say which model
        log.exception("loading model %s from %s failed", name, location.source)
        raise ModelUnavailableError(
            f"model '{name}' could not be loaded from {location.source} ({location.detail}): "
            f"{exc.__class__.__name__}: {exc}"
        ) from exc
    model.eval()
    log.info("loaded model %s from %s in %.2f s", name, location.source, time.monotonic() - started)
    return model


def _load_from(location: ModelLocation, model_dir: Path | None) -> AnyModel:
    from demucs import pretrained  # noqa: PLC0415 - demucs loads only when a model runs

    name = location.name
    if location.source == "model-dir":
        assert model_dir is not None, "locate() picks the model folder only when one is given"
        if name in checkpoint_models.checkpoint_names(model_dir):
            raise ModelUnavailableError(f"model '{name}' is a checkpoint: SeparationEngine.load runs it")
        return pretrained.get_model(name, repo=Path(model_dir))
    if location.source == "hf-cache":
        from demucs.apply import BagOfModels  # noqa: PLC0415 - demucs loads only when a model runs
        from demucs.hf import load_safetensors_model  # noqa: PLC0415 - demucs loads only when a model runs

        cached = _hf_cached_files(name)
        if cached is None:  # removed from the cache since locate() found it
            raise ModelUnavailableError(f"model '{name}' is no longer in the HuggingFace cache")
        yaml_path, weights = cached
        with open(yaml_path) as file:
            bag = yaml.safe_load(file)
        models = [load_safetensors_model(path) for path in weights]
        return BagOfModels(models, bag.get("weights"), bag.get("segment"))
    if location.source == "torch-cache":
        from demucs.repo import BagOnlyRepo, LocalRepo  # noqa: PLC0415 - demucs loads only when a model runs

        checkpoints = LocalRepo(_torch_checkpoints_dir())
        return BagOnlyRepo(_demucs_remote_root(), checkpoints).get_model(name)
    # network: demucs downloads into the HuggingFace cache, falling back to its legacy URL.
    return pretrained.get_model(name)


def pull(name: str, model_dir: Path | None = None, source: model_download.Source | None = None) -> ModelLocation:
    """Download `name` so that it later loads offline: a listed checkpoint's files into the
    model folder, a demucs model into the HuggingFace cache."""
    if _is_listed_checkpoint(name):
        if model_dir is None:
            raise ModelUnavailableError(
                f"model '{name}' is a checkpoint, kept in the model folder: set STEMBOT_MODEL_DIR or --model-dir")
        model_download.fetch_files(BY_NAME[name], Path(model_dir), source or model_download.Source())
        checkpoint_models.describe(name, Path(model_dir))  # its config must read: a clear error now, not at a job
        return ModelLocation(name, "model-dir", str(model_dir))
    location = locate(name, None)
    if location.source == "network":
        load(name, None)
        cached = _hf_cached_files(name)
        where = str(cached[0].parent) if cached else str(_torch_checkpoints_dir())
        return ModelLocation(name, "hf-cache" if cached else "torch-cache", where)
    return location


@dataclass(frozen=True)
class ModelEntry:
    name: str
    available: str  # where it loads from offline, or "" when it would need a download


def list_models(model_dir: Path | None = None) -> list[ModelEntry]:
    """Every model this host knows of, with where it is available offline."""
    entries: dict[str, ModelEntry] = {}
    if model_dir is not None and Path(model_dir).is_dir():
        local = _local_repo_names(Path(model_dir)) | set(checkpoint_models.checkpoint_names(model_dir))
        for name in sorted(local):
            entries[name] = ModelEntry(name, f"model folder {model_dir}")
    for name in official_models():
        if name in entries:
            continue
        if _hf_cached_files(name) is not None:
            entries[name] = ModelEntry(name, "HuggingFace cache")
        elif _torch_cached_files(name) is not None:
            entries[name] = ModelEntry(name, "torch hub cache")
        else:
            entries[name] = ModelEntry(name, "")
    for model in PUBLISHED:
        if model.name not in entries:
            entries[model.name] = ModelEntry(model.name, "")
    return list(entries.values())
