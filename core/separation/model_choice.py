"""Which model runs a request asked for in plain words: `quality: fast|best`,
`backing_vocals: keep|remove`, `clean: dereverb|denoise`, `stems: dialogue`.

Pure: it reads the installed models (name, family, stems), the operator's choices
(`ModelDefaults`, from settings) and the server's allowed models, and answers a `Choice`
or a `ModelChoiceError` that says in one sentence what is missing and who provides it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.errors import BadRequestError
from core.separation.published import BY_NAME, cost_factor_of, speed_class, uses_of

# The requests that want the vocals apart (a vocal model serves them best).
VOCAL_REQUESTS = ("karaoke", "vocals", "no_vocals")
DIALOGUE = "dialogue"
QUALITIES = ("fast", "best")
BACKING = ("keep", "remove")
CLEANING = ("dereverb", "denoise")
PROVIDE = "the bot's operator can install one (`stembot models pull NAME`; README, Models)"


class ModelChoiceError(BadRequestError):
    """No installed and allowed model serves the request: says what is missing and who can fix it."""


@dataclass(frozen=True)
class InstalledModel:
    """A model this bot can run offline, as the choice sees it."""

    name: str
    family: str
    stems: tuple[str, ...]

    @property
    def uses(self) -> tuple[str, ...]:
        return uses_of(self.name, self.stems)

    @property
    def cost_factor(self) -> float:
        return cost_factor_of(self.name, self.family)

    @property
    def speed(self) -> str:
        return BY_NAME[self.name].speed if self.name in BY_NAME else speed_class(self.cost_factor)

    def sdr(self, use: str = "stems") -> float:
        """The publisher's SDR figure for `use` (0 when none is published): higher is better.
        For vocals its vocals figure where it publishes one, else its first."""
        published = BY_NAME.get(self.name)
        if published is None:
            return 0.0
        vocals = re.search(r"vocals(?: SDR)? ([0-9]+(?:\.[0-9]+)?)", published.quality) if use == "vocals" else None
        found = vocals or re.search(r"SDR ([0-9]+(?:\.[0-9]+)?)", published.quality)
        return float(found.group(1)) if found else 0.0


@dataclass(frozen=True)
class ModelDefaults:
    """The operator's choices (settings); None: the best installed model for that use."""

    model: str = "htdemucs"  # STEMBOT_MODEL: what runs when nothing is asked
    fast: str | None = None  # STEMBOT_FAST_MODEL; None: `model`
    best_vocals: str | None = None  # STEMBOT_BEST_VOCALS_MODEL
    best_stems: str | None = None  # STEMBOT_BEST_STEMS_MODEL
    lead_backing: str | None = None  # STEMBOT_LEAD_BACKING_MODEL
    dereverb: str | None = None  # STEMBOT_DEREVERB_MODEL
    denoise: str | None = None  # STEMBOT_DENOISE_MODEL
    dialogue: str | None = None  # STEMBOT_DIALOGUE_MODEL


@dataclass(frozen=True)
class Choice:
    """The model a job runs, the stems it asks of it, and what its minutes cost."""

    model: str
    stems: str  # of `clean_model` when there is one
    cost_factor: float  # a chain's: the sum of its models'
    clean_model: str | None = None  # a chain: this model runs on the vocals `model` separates


@dataclass(frozen=True)
class Request:
    """What a member asked for, in plain words (None: not given)."""

    stems: str = "all"
    model: str | None = None  # a model named outright
    quality: str | None = None
    backing_vocals: str | None = None
    clean: str | None = None


def choose(request: Request, installed: Sequence[InstalledModel], defaults: ModelDefaults,
           allowed: Sequence[str] | None = None, server_default: str | None = None) -> Choice:
    """The model and stems for `request`; raises ModelChoiceError (nobody is charged)."""
    by_name = {model.name: model for model in installed}
    plain_words = [word for word in (request.quality, request.backing_vocals, request.clean) if word]
    if request.model is not None and plain_words:
        raise ModelChoiceError("choose a `model:` or a `quality:`/`backing_vocals:`/`clean:`, not both")
    if request.clean is not None:
        if request.clean not in CLEANING:
            raise ModelChoiceError(f"`clean:` is one of {', '.join(CLEANING)}")
        if request.stems not in ("all", "vocals"):
            raise ModelChoiceError("`clean:` gives a cleaned acapella; leave `stems:` out")
        # A chain: a vocal model, then the cleaning model on its vocals; the stems are the
        # cleaning model's (the clean acapella and what was taken out of it).
        cleaner = _pick(request.clean, getattr(defaults, request.clean), by_name, allowed)
        vocal = _vocal_model(request, by_name, defaults, allowed, server_default)
        first, second = _choice(vocal, "all", by_name), _choice(cleaner, "all", by_name)
        return Choice(vocal, "all", first.cost_factor + second.cost_factor, clean_model=cleaner)
    if request.stems == DIALOGUE:
        if request.quality is not None or request.backing_vocals is not None:
            raise ModelChoiceError("`stems: dialogue` has one model; leave `quality:` out")
        return _choice(_pick(DIALOGUE, defaults.dialogue, by_name, allowed), "all", by_name)
    if request.backing_vocals not in (None, "remove"):
        if request.backing_vocals != "keep":
            raise ModelChoiceError(f"`backing_vocals:` is one of {', '.join(BACKING)}")
        if request.stems != "karaoke":
            raise ModelChoiceError("`backing_vocals:` is for karaoke")
        # Its stems are the lead vocal and the instrumental with the backing vocals in it.
        return _choice(_pick("lead_backing", defaults.lead_backing, by_name, allowed), "all", by_name)
    if request.quality is None:
        name = request.model or server_default or defaults.model
        return _choice(name, request.stems, by_name)
    if request.quality not in QUALITIES:
        raise ModelChoiceError(f"`quality:` is one of {', '.join(QUALITIES)}")
    if request.quality == "fast":
        name = defaults.fast or defaults.model
        _check(name, "fast", by_name, allowed, operator_choice=True)
        return _choice(name, request.stems, by_name)
    use = "vocals" if request.stems in VOCAL_REQUESTS else "stems"
    override = defaults.best_vocals if use == "vocals" else defaults.best_stems
    name = _pick(use, override, by_name, allowed, needs=_sources_of(request.stems))
    return _choice(name, request.stems, by_name)


def _vocal_model(request: Request, by_name: dict[str, InstalledModel], defaults: ModelDefaults,
                 allowed: Sequence[str] | None, server_default: str | None) -> str:
    """The first model of a chain: the one `quality:` picks, else the default when it has
    vocals, else the best vocal model."""
    if request.quality == "fast":
        name = defaults.fast or defaults.model
        _check(name, "fast", by_name, allowed, operator_choice=True)
        if "vocals" not in by_name[name].stems:
            raise ModelChoiceError(f"the fast model `{name}` has no vocals to clean; use `quality: best`")
        return name
    default = server_default or defaults.model
    if request.quality is None and default in by_name and "vocals" in by_name[default].stems and (
            allowed is None or default in allowed):
        return default
    return _pick("vocals", defaults.best_vocals, by_name, allowed, needs=frozenset({"vocals"}))


def best_for(use: str, installed: Iterable[InstalledModel], needs: frozenset[str] = frozenset()) -> list[str]:
    """The installed models that serve `use`, best first: for vocals a model that is not
    Demucs (a RoFormer's vocals are measurably better) before Demucs, then the higher
    published SDR, then the cheaper. `needs`: sources a model must have."""
    serving = [model for model in installed if use in model.uses and needs <= set(model.stems)]
    serving.sort(key=lambda m: (use == "vocals" and m.family == "demucs", -m.sdr(use), m.cost_factor, m.name))
    return [model.name for model in serving]


def _sources_of(stems: str) -> frozenset[str]:
    if stems in ("all", "karaoke"):
        return frozenset({"vocals"}) if stems == "karaoke" else frozenset()
    return frozenset(name.strip().removeprefix("no_") for name in stems.split(",") if name.strip())


def _pick(use: str, override: str | None, by_name: dict[str, InstalledModel], allowed: Sequence[str] | None,
          needs: frozenset[str] = frozenset()) -> str:
    """The operator's model for `use`, else the best installed one the server allows."""
    if override is not None:
        _check(override, use, by_name, allowed, operator_choice=True)
        return override
    candidates = best_for(use, by_name.values(), needs)
    if not candidates:
        raise ModelChoiceError(f"this bot has no {_WORDS[use]} model installed; {PROVIDE}")
    permitted = [name for name in candidates if allowed is None or name in allowed]
    if not permitted:
        raise ModelChoiceError(f"this server allows no {_WORDS[use]} model; a server manager can allow "
                               f"{', '.join(candidates[:3])} with `/stembot models`")
    return permitted[0]


def _check(name: str, use: str, by_name: dict[str, InstalledModel], allowed: Sequence[str] | None,
           operator_choice: bool = False) -> None:
    if name not in by_name:
        whose = "the operator's " if operator_choice else ""
        raise ModelChoiceError(f"{whose}{_WORDS[use]} model `{name}` is not installed on this bot; {PROVIDE}")
    if allowed is not None and name not in allowed:
        raise ModelChoiceError(f"this server does not allow the {_WORDS[use]} model `{name}`; a server manager can "
                               "allow it with `/stembot models`")


def _choice(name: str, stems: str, by_name: dict[str, InstalledModel]) -> Choice:
    model = by_name.get(name)
    factor = model.cost_factor if model is not None else cost_factor_of(name, "demucs")
    return Choice(name, stems, factor)


_WORDS = {"stems": "full-split", "vocals": "vocal", "lead_backing": "lead/backing vocal (karaoke that keeps the "
          "backing vocals)", "dereverb": "de-reverb", "denoise": "denoise", "dialogue": "dialogue",
          "fast": "fast"}


@dataclass(frozen=True)
class Offer:
    """What a plain-word option runs here: shown by /help and /quota."""

    option: str  # how a member asks for it, e.g. "/split quality: best"
    model: InstalledModel  # the model it runs (a chain's: its cleaning model)
    cost_factor: float  # a chain's: the sum of its models'


# Each plain-word option, and the request it makes.
OPTIONS: tuple[tuple[str, Request], ...] = (
    ("/split quality: fast", Request(quality="fast")),
    ("/split quality: best", Request(quality="best")),
    ("/karaoke quality: best", Request(stems="karaoke", quality="best")),
    ("/karaoke backing_vocals: keep", Request(stems="karaoke", backing_vocals="keep")),
    ("/split clean: dereverb", Request(clean="dereverb")),
    ("/split clean: denoise", Request(clean="denoise")),
    ("/split stems: dialogue", Request(stems=DIALOGUE)),
)


def offers(installed: Sequence[InstalledModel], defaults: ModelDefaults, allowed: Sequence[str] | None = None,
           server_default: str | None = None) -> list[Offer]:
    """The plain-word options this bot and server can serve, with the model each runs."""
    by_name = {model.name: model for model in installed}
    found = []
    for option, request in OPTIONS:
        try:
            choice = choose(request, installed, defaults, allowed, server_default)
        except ModelChoiceError:
            continue
        name = choice.clean_model or choice.model
        if name in by_name:
            found.append(Offer(option, by_name[name], choice.cost_factor))
    return found
