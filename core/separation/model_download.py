"""Fetching a listed checkpoint's files into the model folder (`stembot models pull NAME`).

Plain HTTPS from where the model is published (core/separation/published.py), or from the
operator's mirror (STEMBOT_MODEL_MIRROR_URL: `<mirror>/<file name>` for every file). Each
file streams into a hidden temporary file beside its target, no larger than the cap, is
checked against its published sha256 where one is listed, and is renamed into place only
then: a failed or interrupted pull leaves the folder as it was. The URLs are the operator's
(the catalogue, or the mirror they set), never a member's, so this is not the guarded fetcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelUnavailableError
from core.separation.published import PublishedModel

log = logging.getLogger(__name__)

READ_BYTES = 1 << 20
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Source:
    """Where `stembot models pull` fetches listed models from, and how much it takes."""

    mirror_url: str | None = None  # `<mirror>/<file name>` instead of each file's published URL
    max_bytes: int = 4 << 30  # any one file


def file_url(url: str, file_name: str, source: Source) -> str:
    if source.mirror_url:
        return f"{source.mirror_url.rstrip('/')}/{file_name}"
    return url


def fetch_files(model: PublishedModel, folder: Path, source: Source) -> list[Path]:
    """Every file of `model` into `folder` (those already there are kept); their paths."""
    if not model.files:
        raise ModelUnavailableError(f"model '{model.name}' lists no files to download")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digests = dict(model.sha256)
    fetched: list[Path] = []
    for file_name, url in model.files:
        target = folder / file_name
        if not target.is_file():
            _download(file_url(url, file_name, source), target, source.max_bytes, digests.get(file_name), model.name)
        fetched.append(target)
    return fetched


def _download(url: str, target: Path, max_bytes: int, sha256: str | None, model: str) -> None:
    temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    where = url.split("?", 1)[0]  # a mirror's signed query string stays out of messages and logs
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "stembot"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(temporary, "wb") as out:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ModelUnavailableError(
                    f"model '{model}': {target.name} is {int(declared)} bytes, more than the {max_bytes}-byte cap")
            while chunk := response.read(READ_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise ModelUnavailableError(
                        f"model '{model}': {target.name} is larger than the {max_bytes}-byte cap")
                digest.update(chunk)
                out.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelUnavailableError(
                f"model '{model}': {target.name} from {where} does not match its published sha256 "
                f"({digest.hexdigest()}, expected {sha256})")
        temporary.replace(target)
        log.info("downloaded %s (%d bytes) from %s", target.name, size, where)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"model '{model}': {target.name} could not be downloaded from {where} ({_why(exc)}). To provision "
            f"it offline, copy {target.name} into the model folder (STEMBOT_MODEL_DIR / --model-dir), or set "
            "STEMBOT_MODEL_MIRROR_URL to a mirror that serves it") from exc
    finally:
        temporary.unlink(missing_ok=True)


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{exc.__class__.__name__}: {exc}"
