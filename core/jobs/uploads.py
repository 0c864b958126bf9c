"""What a worker may upload for a job, decided by the bot before the job runs.

In distributed mode a worker stores a job's stems through presigned POST policies, one
per file (`core.storage.s3_storage`). The bot names every file a run can honestly make,
from what was asked: each requested stem in the requested format (an mp3 request may
step down to opus to fit Discord's limit, see `core.media.upload_plan`), and the
waveform preview, under the names `core.jobs.results.check_artifacts` makes. Each file
gets a size cap from the track's length and format, and every policy ends with the run
(`TransferWindow`). Nothing else can be stored; what is stored is still checked before
anyone sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from core.jobs.job import Job
from core.jobs.results import PREVIEW, PREVIEW_MAX_BYTES, job_render, output_stems, stem_bytes_cap, with_tolerance
from core.media.audio import OUTPUT_FORMATS, OutputFormat, OutputFormatName
from core.separation.stems import PUBLISHED_SOURCES

# The highest bitrate `check_artifacts` accepts: a worker's own mp3 setting may be anything up to it.
TOP_KBPS = 320
# A model folder's own model: its sources are not known without loading it; those of
# demucs's published models stand for them.
KNOWN_SOURCES = tuple(dict.fromkeys(source for sources in PUBLISHED_SOURCES.values() for source in sources))


@dataclass(frozen=True)
class TransferWindow:
    """How long a job's presigned URLs live after the bot hands the job over.

    The bot hands a job over when a worker slot is ready, plus one job prepared ahead of
    each, which may wait for the slot's running job: at worst the longest track allowed.
    Then the job runs, and runs again when its worker stops heartbeating and another one
    takes it over (the same URLs), up to the attempts allowed. A run takes at most
    `seconds_per_audio_s` per second of audio (a slow CPU worker: demucs on a CPU runs about
    twice as fast as real time, docs/performance.md), and `margin_s` covers starting,
    decoding, encoding and uploading.
    """

    seconds_per_audio_s: float = 2.0
    margin_s: float = 1800.0

    def seconds(self, duration_s: float, longest_s: float, attempts: int) -> float:
        return self.margin_s + self.seconds_per_audio_s * (longest_s + max(1, attempts) * duration_s)


def planned_duration(job: Job, longest_s: float) -> float:
    """The track's length as the bot measured it when it reserved the minutes; when the
    container did not say, the longest track the job may have."""
    if job.reserved_s and job.reserved_s > 0:
        return float(job.reserved_s)
    allowed = (job.limits or {}).get("max_track_s")
    return float(min(longest_s, allowed)) if isinstance(allowed, int | float) and allowed > 0 else longest_s


def expected_uploads(job: Job, duration_s: float) -> dict[str, int]:
    """Every file a worker may upload for `job` (file name -> most bytes), for a track of
    `duration_s` (its files as long as the track at the job's tempo). For `all`: a published
    model's sources, else `KNOWN_SOURCES`; for a mix, `mix` only."""
    stems = output_stems(job) or PUBLISHED_SOURCES.get(job.model) or KNOWN_SOURCES
    longest = with_tolerance(job_render(job).rendered_length(duration_s))
    uploads: dict[str, int] = {}
    for fmt in _possible_formats(job.format):
        cap = stem_bytes_cap(fmt, longest)
        uploads.update({f"{stem}.{fmt.extension}": cap for stem in stems})
    uploads[PREVIEW] = min(PREVIEW_MAX_BYTES, job.attachment_size_limit)
    return uploads


def _possible_formats(requested: str) -> list[OutputFormat]:
    """The formats a run may write for a request, at the highest bitrate allowed."""
    if requested not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {requested!r}")
    names = ("mp3", "opus") if requested == "mp3" else (requested,)
    return [OutputFormat(name=cast("OutputFormatName", name), mp3_bitrate_kbps=TOP_KBPS, opus_bitrate_kbps=TOP_KBPS)
            for name in names]
