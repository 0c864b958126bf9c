"""core.separation.stems: parsing what a user asks for."""

import pytest

from core.errors import BadRequestError
from core.separation.stems import parse_stems

SOURCES = ["drums", "bass", "other", "vocals"]
SIX = ["drums", "bass", "other", "vocals", "guitar", "piano"]


def test_all_is_every_source_of_the_model():
    assert parse_stems("all", SOURCES).outputs == tuple(SOURCES)
    assert parse_stems("all", SIX).outputs == tuple(SIX)


def test_karaoke():
    request = parse_stems("karaoke", SOURCES)
    assert request.outputs == ("vocals", "no_vocals")
    assert request.direct_sources == {"vocals"}


def test_list_with_complements_dedup_and_spaces():
    request = parse_stems(" Vocals, no_bass ,vocals", SOURCES)
    assert request.outputs == ("vocals", "no_bass")
    assert request.direct_sources == {"vocals", "bass"}


@pytest.mark.parametrize("spec", ["guitar", "no_piano", ",", "vocals,kazoo"])
def test_unknown_or_empty_is_refused_with_the_valid_names(spec):
    with pytest.raises(BadRequestError) as info:
        parse_stems(spec, SOURCES)
    assert "unknown stem" in info.value.reason or "no stems" in info.value.reason


def test_karaoke_needs_vocals():
    with pytest.raises(BadRequestError, match="no vocals"):
        parse_stems("karaoke", ["drums", "bass"])
