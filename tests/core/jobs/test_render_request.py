"""core.jobs.render_request: `/split tempo: transpose:` and `/mix`'s options, checked before
anything is queued."""

from __future__ import annotations

import pytest

from core.errors import BadRequestError
from core.jobs.render_request import mix_request, split_render
from core.media.render import RenderOptions


def test_split_options_default_to_the_stems_as_separated():
    assert split_render(None, None) == RenderOptions() and split_render(None, None).to_column() == ""
    assert split_render(80, 2) == RenderOptions(tempo=80, transpose=2)


@pytest.mark.parametrize(("tempo", "transpose"), [(20, None), (151, None), (None, 24), (None, -13)])
def test_split_options_out_of_range_are_refused(tempo, transpose):
    with pytest.raises(BadRequestError):
        split_render(tempo, transpose)


def test_everything_but_the_drums_at_80_percent():
    stems, options = mix_request("htdemucs", None, "drums", None, 80, None)
    assert stems == "bass,other,vocals"
    assert options == RenderOptions(tempo=80, mix=(("bass", 100), ("other", 100), ("vocals", 100)))


def test_chosen_stems_at_chosen_volumes():
    stems, options = mix_request("htdemucs", "vocals, bass other", None, "vocals=50 bass=120", None, -3)
    assert stems == "vocals,bass,other"
    assert options.mix == (("vocals", 50), ("bass", 120), ("other", 100)) and options.transpose == -3


def test_no_stems_named_mixes_every_source_of_the_model():
    stems, _ = mix_request("htdemucs_6s", None, None, None, None, None)
    assert stems == "drums,bass,other,vocals,guitar,piano"
    stems, _ = mix_request("htdemucs_6s", None, "piano,guitar", None, None, None)
    assert stems == "drums,bass,other,vocals"


@pytest.mark.parametrize(("stems", "without", "volumes", "words"), [
    ("vocals", "drums", None, "not both"),
    ("vocals,kazoo", None, None, "unknown stem `kazoo`"),
    (None, "guitar", None, "unknown stem `guitar`"),  # htdemucs has no guitar
    (None, "drums bass other vocals", None, "nothing to mix"),
    ("vocals", None, "drums=50", "drums, which is not in the mix"),
    ("vocals", None, "vocals=loud", "written like"),
    ("vocals,bass", None, "vocals=0 bass=0", "volume 0"),
    ("vocals", None, "vocals=500", "from 0 to 200"),
    ("<@&1>", None, None, "unknown stem"),
])
def test_a_malformed_mix_is_refused_in_words(stems, without, volumes, words):
    with pytest.raises(BadRequestError) as caught:
        mix_request("htdemucs", stems, without, volumes, None, None)
    assert words in caught.value.reason
    assert "<@" not in caught.value.reason
