"""Helpers for the links users give: is it a link, and what to name its stem folder."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Anything shaped like `scheme://` is a link; the fetcher refuses schemes other than http(s)
# with a clear reason, which beats "file not found".
_LINK = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_UNSAFE_NAME_CHARS = re.compile(r"[^\w.\- ]+")


def is_link(text: str | Path) -> bool:
    return isinstance(text, str) and _LINK.match(text) is not None


def output_name(path: str | Path) -> str:
    """The stem folder's name: the input's file name without its extension (for a link,
    the last part of its path, made safe as a folder name)."""
    if is_link(path):
        return link_output_name(str(path))
    return Path(path).stem or Path(path).name


def link_output_name(url: str) -> str:
    """A folder name from a link's file name: `https://x.org/a/My%20Song.mp3` -> `My Song`."""
    try:
        parts = urlsplit(url)
        last = unquote(parts.path.rstrip("/").rsplit("/", 1)[-1])
        host = parts.hostname or ""
    except ValueError:
        last, host = "", ""
    for candidate in (Path(last).stem if "." in last.lstrip(".") else last, host):
        name = _UNSAFE_NAME_CHARS.sub("_", candidate).strip(" ._")[:100].strip(" ._")
        if name:
            return name
    return "download"


