"""Choosing an encoding whose files fit Discord's upload limit, or falling back to links.

Discord takes at most `MAX_ATTACHMENTS` files per message and each file at most the
server's `attachment_size_limit` (10 MiB for bots, more in boosted servers). The plan
is made before encoding, from size estimates; the caller must still check the real
sizes afterwards with `fits`, because lossless compression varies with the music.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from core.errors import DeliveryTooLargeError
from core.media.audio import OutputFormat

MAX_ATTACHMENTS = 10
# Plans aim below the limit, so that an estimate a little short still fits.
SAFETY_MARGIN = 0.95
# Room for tags and container headers (ID3, Xing/LAME frame, OpusHead/OpusTags, WAV LIST).
CONTAINER_SLACK_BYTES = 4 * 1024
WAV_HEADER_BYTES = 44
MP3_OVERHEAD = 1.01
# Opus is VBR; constrained VBR stays within a few percent of the target, ogg pages add ~2%.
# Unconstrained VBR does not: it reaches 1.8x on tonal stems (a bass line, a held vowel).
OPUS_OVERHEAD = 1.15
FLAC_RATIO = 0.7
WAV_BYTES_PER_SAMPLE = {"16": 2, "24": 3, "float": 4}

MP3_LADDER_KBPS = (320, 256, 192, 160, 128)
OPUS_LADDER_KBPS = (128, 96, 64)
# Only when there are no download links to fall back to: small, but better than nothing.
OPUS_LAST_RESORT_KBPS = (48, 32)
DEFAULT_LINK_VALID_HOURS = 24


@dataclass(frozen=True)
class UploadPlan:
    """How stems go out: the encoding, and as attachments or as download links."""

    format: OutputFormat
    mode: Literal["attach", "links"]
    downgraded: bool
    #: a short sentence for the user when downgraded or sent as links; "" otherwise
    note: str = ""


def estimate_size(fmt: OutputFormat, duration_s: float, sample_rate: int = 44100, channels: int = 2) -> int:
    """A conservative size in bytes of one stem of `duration_s` encoded as `fmt`.

    - mp3 (CBR): bitrate * duration / 8, + 1% (frame padding, encoder delay) + 4 KiB tags.
    - opus (VBR in ogg): bitrate * duration / 8 * 1.15 + 4 KiB; holds for constrained VBR.
    - wav: sample_rate * channels * bytes per sample * duration + 44-byte header (+ 4 KiB
      for the LIST/fact chunks ffmpeg adds); 2 bytes for 16-bit, 3 for 24-bit, 4 for float.
    - flac: 0.7 x the wav of the same depth (float is stored as 24-bit). Lossless
      compression varies (noise barely compresses), so check the real sizes afterwards.
    """
    duration_s = max(0.0, float(duration_s))
    if fmt.name == "mp3":
        return int(fmt.mp3_bitrate_kbps * 1000 * duration_s / 8 * MP3_OVERHEAD) + CONTAINER_SLACK_BYTES
    if fmt.name == "opus":
        return int(fmt.opus_bitrate_kbps * 1000 * duration_s / 8 * OPUS_OVERHEAD) + CONTAINER_SLACK_BYTES
    if fmt.name == "wav":
        pcm = sample_rate * channels * WAV_BYTES_PER_SAMPLE[fmt.wav_depth] * duration_s
        return int(pcm) + WAV_HEADER_BYTES + CONTAINER_SLACK_BYTES
    if fmt.name == "flac":
        depth = 2 if fmt.wav_depth == "16" else 3
        return int(sample_rate * channels * depth * duration_s * FLAC_RATIO) + CONTAINER_SLACK_BYTES
    raise ValueError(f"unknown output format {fmt.name!r}")


def fits(sizes: Iterable[int], limit_bytes: int) -> bool:
    """Whether files of these sizes can be attached to one message: few enough, each within the limit."""
    sizes = list(sizes)
    return len(sizes) <= MAX_ATTACHMENTS and all(size <= limit_bytes for size in sizes)


def human_size(n: int | float) -> str:
    """A size as Discord shows it: binary units labelled kB/MB ("9.5 MB", "10 MB", "25 MB")."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            value = n / scale
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return f"{text.removesuffix('.0')} {unit}"
    return f"{int(n)} B"


def describe_format(fmt: OutputFormat) -> str:
    """"MP3 at 192 kbps", "Opus at 64 kbps", "WAV", "FLAC"."""
    if fmt.name == "mp3":
        return f"MP3 at {fmt.mp3_bitrate_kbps} kbps"
    if fmt.name == "opus":
        return f"Opus at {fmt.opus_bitrate_kbps} kbps"
    return fmt.name.upper()


def lossy_ladder(requested: OutputFormat, *, last_resort: bool = False) -> list[OutputFormat]:
    """The requested lossy format, then every rung of lower quality, best first.

    An mp3 request walks down the mp3 rungs, then opus (which at a given bitrate sounds
    at least as good as mp3, so only opus rungs not above the mp3 bitrate). An opus
    request stays in opus. `last_resort` appends opus 48 and 32 kbps.
    """
    opus_rungs = OPUS_LADDER_KBPS + (OPUS_LAST_RESORT_KBPS if last_resort else ())
    if requested.name == "mp3":
        top = requested.mp3_bitrate_kbps
        mp3 = [replace(requested, mp3_bitrate_kbps=b) for b in MP3_LADDER_KBPS if b < top]
        opus = [replace(requested, name="opus", opus_bitrate_kbps=b) for b in opus_rungs if b <= top]
        return [requested, *mp3, *opus]
    if requested.name == "opus":
        top = requested.opus_bitrate_kbps
        return [requested, *(replace(requested, opus_bitrate_kbps=b) for b in opus_rungs if b < top)]
    raise ValueError(f"{requested.name} is not a lossy format")


def plan_upload(
    requested: OutputFormat,
    duration_s: float,
    stem_count: int,
    limit_bytes: int,
    links_available: bool,
    *,
    sample_rate: int = 44100,
    channels: int = 2,
    link_valid_hours: float = DEFAULT_LINK_VALID_HOURS,
) -> UploadPlan:
    """Pick the best encoding whose files fit `limit_bytes`, else links, else refuse.

    Lossless requests are never downgraded: attached if they fit, else links. Lossy
    requests walk `lossy_ladder`; when nothing fits they go out as links in the
    requested format, or, with no links, down to opus 32 kbps before giving up.
    Raises `DeliveryTooLargeError` when there is no way to deliver.
    """
    budget = int(limit_bytes * SAFETY_MARGIN)
    limit_text = human_size(limit_bytes)

    def attachable(fmt: OutputFormat) -> bool:
        size = estimate_size(fmt, duration_s, sample_rate, channels)
        return fits([size] * stem_count, budget)

    if stem_count > MAX_ATTACHMENTS:
        if links_available:
            note = (f"There are more than {MAX_ATTACHMENTS} stems, so here are download links "
                    f"(valid {link_valid_hours:g} h).")
            return UploadPlan(requested, "links", False, note)
        raise DeliveryTooLargeError(
            f"{stem_count} stems are more than the {MAX_ATTACHMENTS} files Discord takes in one message; "
            "the server admin can set STEMBOT_PUBLIC_URL to enable download links"
        )

    if requested.is_lossless:
        if attachable(requested):
            return UploadPlan(requested, "attach", False)
        if links_available:
            return UploadPlan(requested, "links", False, links_note(limit_bytes, link_valid_hours))
        raise too_large_error(requested, limit_bytes)

    for fmt in lossy_ladder(requested, last_resort=not links_available):
        if attachable(fmt):
            if fmt == requested:
                return UploadPlan(fmt, "attach", False)
            note = (f"Files were too large for this server's {limit_text} upload limit, "
                    f"so they are {describe_format(fmt)}.")
            return UploadPlan(fmt, "attach", True, note)
    if links_available:
        return UploadPlan(requested, "links", False, links_note(limit_bytes, link_valid_hours))
    raise too_large_error(requested, limit_bytes)


def links_note(limit_bytes: int, link_valid_hours: float) -> str:
    """What the user reads when stems come as links because they were too large."""
    return (f"Files were too large for this server's {human_size(limit_bytes)} upload limit, "
            f"so here are download links (valid {link_valid_hours:g} h).")


def too_large_error(requested: OutputFormat, limit_bytes: int) -> DeliveryTooLargeError:
    """The refusal when the stems fit no upload and no download links are set up."""
    smallest = "" if requested.is_lossless else ", even at the smallest quality"
    return DeliveryTooLargeError(
        f"the stems are too large to upload to this server ({human_size(limit_bytes)} limit{smallest}); "
        "the server admin can set STEMBOT_PUBLIC_URL to enable download links"
    )
