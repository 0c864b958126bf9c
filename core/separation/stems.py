"""Which stems a request asks for, and which of a model's sources it needs.

A request is `all` (every source of the model), `karaoke` (`vocals` + `no_vocals`), or a
comma-separated list of source names, where `no_<source>` means everything but that
source (a practice track without the bass is `no_bass`).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import BadRequestError
from core.separation.published import PUBLISHED

KARAOKE = ("vocals", "no_vocals")
MUSDB_SOURCES = ("drums", "bass", "other", "vocals")
# The sources of demucs's published models and of the listed checkpoints (their YAML's
# instruments, the target first), known without loading one: the bot checks a worker's `all`
# result against them (a model folder's own models are not listed).
PUBLISHED_SOURCES: dict[str, tuple[str, ...]] = {
    **{name: MUSDB_SOURCES for name in (
        "htdemucs", "htdemucs_ft", "hdemucs_mmi", "mdx", "mdx_extra", "mdx_q", "mdx_extra_q",
        "repro_mdx_a", "repro_mdx_a_hybrid_only", "repro_mdx_a_time_only")},
    "htdemucs_6s": (*MUSDB_SOURCES, "guitar", "piano"),
    **{model.name: model.stems for model in PUBLISHED if model.family != "demucs"},
}


@dataclass(frozen=True)
class StemRequest:
    """The output stems, in order, and the model sources they are computed from."""

    outputs: tuple[str, ...]

    @property
    def direct_sources(self) -> frozenset[str]:
        """Sources that must be estimated for this request (`no_x` needs `x`)."""
        return frozenset(name.removeprefix("no_") for name in self.outputs)

    @property
    def spec(self) -> str:
        return ",".join(self.outputs)


def parse_stems(spec: str, sources: list[str] | tuple[str, ...]) -> StemRequest:
    """Turn `all`, `karaoke` or `a,b,no_c` into a StemRequest for a model with `sources`."""
    spec = (spec or "all").strip().lower()
    if spec == "all":
        return StemRequest(tuple(sources))
    if spec == "karaoke":
        if "vocals" not in sources:
            raise BadRequestError("this model has no vocals stem, so karaoke is not possible")
        return StemRequest(KARAOKE)
    outputs: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        base = name.removeprefix("no_")
        if base not in sources:
            valid = ", ".join(list(sources) + [f"no_{s}" for s in sources])
            raise BadRequestError(f"unknown stem '{name}'; this model has: {valid}")
        if name not in outputs:
            outputs.append(name)
    if not outputs:
        raise BadRequestError("no stems requested")
    return StemRequest(tuple(outputs))
