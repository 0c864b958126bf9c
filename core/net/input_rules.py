"""What users may send, from the settings: the limits on inputs and where they may be
fetched from (core.runtime builds the bot's from them; `stembot separate` uses them
without loading the bot's database and storage)."""

from __future__ import annotations

from core.media.audio import Limits
from core.net.fetcher import FetchRules, SourceRules
from core.settings import Settings


def limits_of(settings: Settings) -> Limits:
    """The limits on what users send, for core.media.audio."""
    return Limits(settings.min_duration_s, settings.max_duration_s, settings.max_input_bytes)


def fetch_rules_of(settings: Settings) -> SourceRules:
    """Where inputs may be fetched from: attachments from the Discord CDN origins only,
    links from public sites and the operator's allowed networks. ValueError on a bad value."""
    return SourceRules(links=FetchRules.for_links(settings.fetch_allowed_network_list),
                       attachments=FetchRules.for_attachments(settings.discord_cdn_origins))
