"""The render options of a request, from what a member typed: `/split tempo: transpose:`
and `/mix stems:|without: volumes: tempo: transpose:`.

Checked where the command is answered, before anything is queued: a value out of range, a
malformed `volumes:` or a stem the model does not have is refused with a short message
(BadRequestError), and nobody is charged.
"""

from __future__ import annotations

import re

from core.errors import BadRequestError
from core.media.render import RenderOptions, parse_volumes, shown_text
from core.separation.stems import MUSDB_SOURCES, PUBLISHED_SOURCES

_SEPARATORS = re.compile(r"[\s,;+]+")


def model_sources(model: str) -> tuple[str, ...]:
    """The stems a model makes: a published model's own; for a model folder's model (not
    known without loading it), the four of MUSDB that nearly all of them make (the model
    host refuses a stem its model lacks, uncharged)."""
    return PUBLISHED_SOURCES.get(model, MUSDB_SOURCES)


def split_render(tempo: int | None, transpose: int | None) -> RenderOptions:
    """`/split`'s options: the stems at `tempo` % speed, `transpose` semitones up or down."""
    return RenderOptions(tempo=100 if tempo is None else tempo, transpose=transpose or 0)


def mix_request(model: str, stems: str | None, without: str | None, volumes: str | None,
                tempo: int | None, transpose: int | None) -> tuple[str, RenderOptions]:
    """`/mix`'s options: the stems to separate (the job's `stems`) and how to mix them.

    `stems:` names the stems to keep, `without:` the ones to leave out (not both); neither
    keeps them all. `volumes:` ("vocals=50 bass=120") sets some of their levels in percent,
    100 by default."""
    sources = model_sources(model)
    if stems and stems.strip() and without and without.strip():
        raise BadRequestError("give `stems:` (what to keep) or `without:` (what to leave out), not both")
    if stems and stems.strip():
        chosen = _names(stems, sources)
    else:
        left_out = _names(without or "", sources)
        chosen = [source for source in sources if source not in left_out]
        if not chosen:
            raise BadRequestError("that leaves nothing to mix")
    levels = parse_volumes(volumes)
    for name in levels:
        if name not in chosen:
            raise BadRequestError(f"`volumes:` names {name}, which is not in the mix ({', '.join(chosen)})")
    mix = tuple((name, levels.get(name, 100)) for name in chosen)
    if all(volume == 0 for _, volume in mix):
        raise BadRequestError("every stem of that mix is at volume 0")
    options = RenderOptions(tempo=100 if tempo is None else tempo, transpose=transpose or 0, mix=mix)
    return ",".join(chosen), options


def _names(text: str, sources: tuple[str, ...]) -> list[str]:
    """Stem names, separated by commas or spaces, each once, each one of `sources`."""
    names: list[str] = []
    for raw in _SEPARATORS.split(text.strip().lower()):
        if not raw:
            continue
        if raw not in sources:
            raise BadRequestError(f"unknown stem `{shown_text(raw)}`; this model has: {', '.join(sources)}")
        if raw not in names:
            names.append(raw)
    return names
