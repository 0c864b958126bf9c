"""core.media.upload_plan: the quality ladder, links and refusals, and estimates checked against real encodes."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import DeliveryTooLargeError, StembotError
from core.media.audio import OutputFormat, encode_stems
from core.media.upload_plan import (
    MAX_ATTACHMENTS,
    SAFETY_MARGIN,
    UploadPlan,
    estimate_size,
    fits,
    human_size,
    lossy_ladder,
    plan_upload,
)

MiB = 1024 * 1024
BOT_LIMIT = 10 * MiB
BOOSTED_LIMIT = 100 * MiB
MP3_320 = OutputFormat("mp3", mp3_bitrate_kbps=320)


def test_short_song_at_320_is_attached_unchanged():
    # 4:00 at 320 kbps is 9.6 MB, within 10 MiB (10.49 MB): no reason to downgrade.
    plan = plan_upload(MP3_320, 240, 4, BOT_LIMIT, links_available=True)
    assert plan == UploadPlan(MP3_320, "attach", False, "")


def test_longer_song_steps_down_to_the_best_mp3_that_fits():
    plan = plan_upload(MP3_320, 4 * 60 + 30, 4, BOT_LIMIT, links_available=True)
    assert plan.mode == "attach" and plan.downgraded
    assert plan.format.name == "mp3" and plan.format.mp3_bitrate_kbps == 256
    assert estimate_size(plan.format, 270) <= BOT_LIMIT * SAFETY_MARGIN
    assert estimate_size(MP3_320, 270) > BOT_LIMIT * SAFETY_MARGIN
    assert plan.note == "Files were too large for this server's 10 MB upload limit, so they are MP3 at 256 kbps."


def test_seven_minute_song_goes_further_down():
    plan = plan_upload(MP3_320, 7 * 60, 4, BOT_LIMIT, links_available=True)
    assert (plan.format.name, plan.format.mp3_bitrate_kbps, plan.mode) == ("mp3", 160, "attach")
    assert "MP3 at 160 kbps" in plan.note


def test_twenty_minutes_with_links_sends_links_in_the_requested_format():
    plan = plan_upload(MP3_320, 20 * 60, 4, BOT_LIMIT, links_available=True)
    assert plan.mode == "links" and not plan.downgraded
    assert plan.format == MP3_320
    assert "download links (valid 24 h)" in plan.note and "10 MB" in plan.note
    plan = plan_upload(MP3_320, 20 * 60, 4, BOT_LIMIT, links_available=True, link_valid_hours=72.0)
    assert plan.note.endswith("download links (valid 72 h).")


def test_twenty_minutes_without_links_falls_to_low_opus():
    plan = plan_upload(MP3_320, 20 * 60, 4, BOT_LIMIT, links_available=False)
    assert plan.mode == "attach" and plan.downgraded
    # opus 64 is 11 MB for 20 minutes; the last-resort rungs are only for "no links".
    assert (plan.format.name, plan.format.opus_bitrate_kbps) == ("opus", 48)
    assert "Opus at 48 kbps" in plan.note


def test_nothing_fits_and_no_links_is_refused_with_a_hint():
    with pytest.raises(DeliveryTooLargeError) as caught:
        plan_upload(MP3_320, 20 * 60, 4, 2 * MiB, links_available=False)
    assert isinstance(caught.value, StembotError)
    assert caught.value.kind == "too_large_to_deliver"
    assert "too large to upload" in caught.value.reason
    assert "STEMBOT_PUBLIC_URL" in caught.value.reason


def test_lossless_wav_is_never_downgraded():
    wav = OutputFormat("wav")
    plan = plan_upload(wav, 240, 4, BOT_LIMIT, links_available=True)
    assert plan == UploadPlan(wav, "links", False, plan.note)
    assert "download links" in plan.note
    with pytest.raises(DeliveryTooLargeError, match="STEMBOT_PUBLIC_URL"):
        plan_upload(wav, 240, 4, BOT_LIMIT, links_available=False)


def test_short_flac_is_attached():
    flac = OutputFormat("flac")
    plan = plan_upload(flac, 20, 4, BOT_LIMIT, links_available=False)
    assert plan == UploadPlan(flac, "attach", False, "")


def test_boosted_server_keeps_320():
    for minutes in (4, 20):
        plan = plan_upload(MP3_320, minutes * 60, 4, BOOSTED_LIMIT, links_available=False)
        assert plan == UploadPlan(MP3_320, "attach", False, "")


def test_opus_request_stays_opus_and_starts_at_its_bitrate():
    opus = OutputFormat("opus", opus_bitrate_kbps=160)
    assert [f.opus_bitrate_kbps for f in lossy_ladder(opus)] == [160, 128, 96, 64]
    assert all(f.name == "opus" for f in lossy_ladder(opus, last_resort=True))
    plan = plan_upload(opus, 10 * 60, 4, BOT_LIMIT, links_available=True)
    assert (plan.format.name, plan.format.opus_bitrate_kbps, plan.mode) == ("opus", 96, "attach")


def test_ladder_never_goes_above_the_requested_quality():
    low_mp3 = OutputFormat("mp3", mp3_bitrate_kbps=96)
    ladder = lossy_ladder(low_mp3, last_resort=True)
    assert ladder[0] == low_mp3
    assert [(f.name, f.opus_bitrate_kbps) for f in ladder[1:]] == [("opus", 96), ("opus", 64), ("opus", 48),
                                                                    ("opus", 32)]
    full = lossy_ladder(MP3_320)
    assert [f.mp3_bitrate_kbps for f in full if f.name == "mp3"] == [320, 256, 192, 160, 128]
    assert [f.opus_bitrate_kbps for f in full if f.name == "opus"] == [128, 96, 64]


def test_more_than_ten_stems_go_as_links():
    plan = plan_upload(MP3_320, 10, MAX_ATTACHMENTS + 1, BOOSTED_LIMIT, links_available=True)
    assert plan.mode == "links"
    with pytest.raises(DeliveryTooLargeError):
        plan_upload(MP3_320, 10, MAX_ATTACHMENTS + 1, BOOSTED_LIMIT, links_available=False)


def test_estimates_and_fits():
    assert estimate_size(OutputFormat("wav", wav_depth="16"), 10) >= 44100 * 2 * 2 * 10 + 44
    assert estimate_size(OutputFormat("wav", wav_depth="24"), 10) >= 44100 * 2 * 3 * 10
    assert estimate_size(OutputFormat("wav", wav_depth="float"), 10) >= 44100 * 2 * 4 * 10
    assert estimate_size(OutputFormat("flac"), 10) < estimate_size(OutputFormat("wav"), 10)
    assert estimate_size(OutputFormat("mp3", mp3_bitrate_kbps=128), 60) == int(128_000 * 60 / 8 * 1.01) + 4096
    assert fits([100, 200], 200) and not fits([100, 201], 200)
    assert not fits([1] * (MAX_ATTACHMENTS + 1), 200)
    assert human_size(10 * MiB) == "10 MB" and human_size(9.5 * MiB) == "9.5 MB"


# --- real encodes: the estimates must be conservative for the encoder we actually run ---

RATE = 44100
SECONDS = 25


def _stems() -> dict[str, np.ndarray]:
    """Four stems with the kinds of content that push VBR encoders up: a held vibrato
    tone, noise bursts, a decaying bass note, a chord over light noise."""
    t = np.arange(RATE * SECONDS) / RATE
    rng = np.random.default_rng(0)

    def stereo(left, right=None):
        return np.stack([left, left if right is None else right]).astype(np.float32)

    hits = np.exp(-((t * 4) % 1) * 30)
    pulse = np.exp(-((t * 2) % 1) * 8)
    return {
        "vocals": stereo(0.4 * np.sin(2 * np.pi * (330 + 20 * np.sin(2 * np.pi * 5 * t)) * t)
                         * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))),
        "drums": stereo(0.6 * rng.standard_normal(t.size) * hits, 0.6 * rng.standard_normal(t.size) * hits),
        "bass": stereo(0.5 * np.sin(2 * np.pi * 55 * t) * pulse + 0.2 * np.sin(2 * np.pi * 110 * t) * pulse),
        "other": stereo(0.2 * sum(np.sin(2 * np.pi * f * t) for f in (262, 330, 392))
                        + 0.02 * rng.standard_normal(t.size)),
    }


def _limit_between(smaller: OutputFormat, larger: OutputFormat) -> int:
    """A limit under which `smaller` fits (with the margin) and `larger` does not."""
    low, high = estimate_size(smaller, SECONDS), estimate_size(larger, SECONDS)
    assert low < high
    return int((low + high) / 2 / SAFETY_MARGIN)


def _check_real_encode(tmp_path, requested, expected, limit):
    plan = plan_upload(requested, SECONDS, 4, limit, links_available=False)
    assert plan.mode == "attach" and plan.format == expected and plan.downgraded
    paths = encode_stems(_stems(), RATE, tmp_path, plan.format)
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    estimate = estimate_size(plan.format, SECONDS)
    assert all(size <= estimate for size in sizes.values()), (sizes, estimate)
    assert fits(sizes.values(), limit)


def test_real_mp3_encode_fits_the_plan(tmp_path):
    mp3_128 = OutputFormat("mp3", mp3_bitrate_kbps=128)
    limit = _limit_between(mp3_128, OutputFormat("mp3", mp3_bitrate_kbps=160))
    _check_real_encode(tmp_path, MP3_320, mp3_128, limit)


def test_real_opus_encode_fits_the_plan(tmp_path):
    opus_64 = OutputFormat("opus", opus_bitrate_kbps=64)
    limit = _limit_between(opus_64, OutputFormat("opus", opus_bitrate_kbps=96))
    _check_real_encode(tmp_path, OutputFormat("opus", opus_bitrate_kbps=160), opus_64, limit)
