"""The buttons of a result message."""

from __future__ import annotations

from bot.exts.split._views import link_view


async def test_the_player_button_comes_first_and_the_total_stays_within_discords_limit():
    links = {f"stem{i}.wav": f"https://example.org/dl/1/stem{i}.wav" for i in range(30)}
    view = link_view(links, "https://example.org/player/1?exp=1&sig=2")
    assert view is not None
    labels = [item.label for item in view.children]
    assert len(labels) == 25 and labels[0] == "Open player" and labels[1:] == list(links)[:24]
    assert view.children[0].url == "https://example.org/player/1?exp=1&sig=2"


async def test_no_player_button_without_a_public_web_server():
    assert [item.label for item in link_view({"a.wav": "https://x/a"}).children] == ["a.wav"]
    assert link_view({}) is None
    assert [item.label for item in link_view({}, "https://x/player/1").children] == ["Open player"]
