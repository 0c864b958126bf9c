"""A job told to an operator (`stembot jobs`, `/stembot jobs`): one line, or every field.

Never shows a secret: not the interaction's token, not the presigned URLs of a job's
transfer, not the query of a source link (Discord's attachment links are signed).
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from core.jobs.job import Job


def age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def short(text: str | None, width: int = 40) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def without_query(url: str) -> str:
    """A link without its query and fragment (where signatures live)."""
    parts = urlsplit(url)
    if not parts.query and not parts.fragment:
        return url
    return urlunsplit(parts._replace(query="", fragment="")) + " (query hidden)"


def describe(job: Job) -> list[tuple[str, str]]:
    def when(moment: datetime | None) -> str:
        return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"

    artifacts = sorted(job.artifacts) if isinstance(job.artifacts, dict) else []
    return [
        ("id", str(job.id)), ("state", job.state), ("progress", f"{job.progress:.0%}"),
        ("attempts", str(job.attempts)), ("worker", job.worker or "-"),
        ("error", job.error or "-"), ("error kind", job.error_kind or "-"),
        ("user", str(job.user_id)), ("server", str(job.guild_id or "DM")), ("channel", str(job.channel_id or "-")),
        ("status message", str(job.status_message_id or "-")),
        ("interaction token", "present" if job.interaction_token else "none"),
        ("source", f"{job.source_kind}: {job.source_name}"), ("source link", without_query(job.source_url)),
        ("model", f"{job.model} -> {job.clean_model}" if job.clean_model else job.model), ("stems", job.stems),
        ("format", job.format),
        ("render", job.render_options or "-"), ("priority", str(job.priority)),
        ("length", "-" if job.duration_s is None else f"{job.duration_s:.1f} s"),
        ("queue job", str(job.queue_job_id or "-")),
        ("transfer URLs", "present" if job.transfer else "none"),
        ("slot", job.slot_state),
        ("minutes", f"{job.quota_state} ({job.reserved_s:.1f} s at {job.cost_factor or 1.0:g}x, "
                    f"day {job.quota_day or '-'})"),
        ("cache hit", "yes" if job.cache_hit else "no"),
        ("files", ", ".join(artifacts) if artifacts else "-"),
        ("created", when(job.created_at)), ("started", when(job.started_at)),
        ("last heartbeat", when(job.heartbeat_at)), ("updated", when(job.updated_at)),
        ("finished", when(job.finished_at)), ("delivered", when(job.delivered_at)),
        ("files deleted", when(job.artifacts_deleted_at)),
    ]
