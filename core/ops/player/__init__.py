"""The stem player: a signed, expiring page of the bot's public web server where a job's
stems play together in the browser (mute, solo, volume, loop, tempo and key, a mix to
download).

The page and its scripts are files of this package, served by `core.ops.web`; nothing
comes from another site. The job's data (its stems' links, names and colours) goes into
the page as a JSON block, never as script, under a strict Content-Security-Policy: the
only scripts that run are this package's own, and the page may fetch only from this
origin and, in distributed mode, from the object store's origin (presigned stem links).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.media.preview import stem_colour

ASSETS_DIR = Path(__file__).parent
PAGE = "index.html"
# What `/player/assets/<name>` serves: these files and nothing else of the package.
ASSETS = {
    "player.js": "text/javascript",
    "mixer.js": "text/javascript",
    "player.css": "text/css",
}

_PLACEHOLDER = re.compile(r"\{\{(TITLE|MANIFEST)\}\}")
# job id, expiry of the page's link (unix time) -> the page's manifest, or None when the
# job has no stems to play (unknown, unfinished, failed, or its files deleted).
PlayerManifest = Callable[[int, int], Awaitable[dict[str, Any] | None]]


def player_path(job_id: int | str) -> str:
    """The path a player link signs (`LinkSigner.sign_player`)."""
    return f"{job_id}/player"


def manifest(*, title: str, links: Mapping[str, str], expires_at: int, bpm: float | None = None,
             key: str | None = None) -> dict[str, Any]:
    """What the page needs: one entry per stem file (`links`: file name -> URL), in order."""
    stems = []
    for file_name, url in links.items():
        name = file_name.rsplit(".", 1)[0]
        stems.append({"name": name, "file": file_name, "url": url, "colour": "#" + stem_colour(name)[2:]})
    out: dict[str, Any] = {"title": title, "stems": stems, "expires": int(expires_at)}
    if bpm is not None:
        out["bpm"] = bpm
    if key is not None:
        out["key"] = key
    return out


def connect_origins(data: Mapping[str, Any]) -> list[str]:
    """The other origins the page fetches stems from (presigned object-store links)."""
    origins: list[str] = []
    for stem in data.get("stems", []):
        parts = urlsplit(str(stem.get("url", "")))
        if parts.scheme in ("http", "https") and parts.netloc:
            origin = f"{parts.scheme}://{parts.netloc}"
            if origin not in origins:
                origins.append(origin)
    return origins


def content_security_policy(extra_connect: list[str] | None = None) -> str:
    """Only this package's scripts and styles; fetches from this origin (and the object
    store's); no frames, forms, plugins or inline code."""
    connect = " ".join(["'self'", *(extra_connect or [])])
    return ("default-src 'none'; script-src 'self'; style-src 'self'; "
            f"connect-src {connect}; media-src 'self' blob:; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def render_page(data: Mapping[str, Any]) -> str:
    """The player page with `data` in its JSON block. `<`, `>` and `&` are escaped in the
    JSON, so no value (a track's name) can close the block or open a tag."""
    blob = json.dumps(data, ensure_ascii=False).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    values = {"TITLE": html.escape(str(data.get("title", "")), quote=True), "MANIFEST": blob}
    # One pass, so a title that reads "{{MANIFEST}}" stays text.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], (ASSETS_DIR / PAGE).read_text(encoding="utf-8"))
