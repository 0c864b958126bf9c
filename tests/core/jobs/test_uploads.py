"""core.jobs.uploads: the files a worker may upload for a job, their size caps, and how long
its presigned URLs live; checked against what `core.jobs.results` accepts and against
stems a real encoder writes."""

from __future__ import annotations

import pytest

from core.jobs.job import Job
from core.jobs.results import PREVIEW_MAX_BYTES, CheckedResults, check_artifacts, max_stem_bytes
from core.jobs.uploads import KNOWN_SOURCES, TransferWindow, expected_uploads, planned_duration
from core.media.audio import OutputFormat
from core.media.render import RenderOptions
from tests.support.media import ffmpeg


def job(stems: str = "all", fmt: str = "mp3", **fields) -> Job:
    values = dict(id=1, guild_id=1, user_id=1, source_kind="attachment", source_url="https://cdn.invalid/x",
                  source_name="song.wav", model="tiny", stems=stems, format=fmt, state="delivering",
                  attachment_size_limit=10 * 1024 * 1024, reserved_s=0.0)
    values.update(fields)
    return Job(**values)


def test_karaoke_in_mp3_may_upload_its_two_stems_in_mp3_or_opus_and_the_preview():
    uploads = expected_uploads(job("karaoke", "mp3"), 60.0)
    assert set(uploads) == {"vocals.mp3", "no_vocals.mp3", "vocals.opus", "no_vocals.opus", "preview.png"}


def test_named_stems_in_a_lossless_format_step_down_to_nothing_else():
    assert set(expected_uploads(job("vocals,no_drums", "flac"), 60.0)) == {
        "vocals.flac", "no_drums.flac", "preview.png"}
    assert set(expected_uploads(job("bass", "wav"), 60.0)) == {"bass.wav", "preview.png"}


def test_all_is_a_published_models_sources_else_every_published_source():
    assert set(expected_uploads(job("all", "opus", model="htdemucs"), 60.0)) == {
        "drums.opus", "bass.opus", "other.opus", "vocals.opus", "preview.png"}
    assert set(expected_uploads(job("all", "flac", model="htdemucs_6s"), 60.0)) == {
        f"{s}.flac" for s in ("drums", "bass", "other", "vocals", "guitar", "piano")} | {"preview.png"}
    # A model folder's own model (`tiny`): its sources are not known without loading it.
    # demucs's, then the listed checkpoints' (core/separation/published.py).
    assert KNOWN_SOURCES[:6] == ("drums", "bass", "other", "vocals", "guitar", "piano")
    assert {"instrumental", "noreverb", "reverb", "dry"} <= set(KNOWN_SOURCES)
    assert set(expected_uploads(job("all", "wav", model="tiny"), 60.0)) == {
        f"{s}.wav" for s in KNOWN_SOURCES} | {"preview.png"}


@pytest.mark.parametrize(("fmt", "written"), [("mp3", "mp3"), ("mp3", "opus"), ("opus", "opus"),
                                               ("wav", "wav"), ("flac", "flac")])
def test_every_name_an_honest_run_reports_has_an_upload_policy(fmt, written):
    """The names come from the same place as the ones `check_artifacts` makes."""
    for stems in ("all", "karaoke", "vocals,no_bass"):
        asked = job(stems, fmt, duration_s=30.0, reserved_s=30.0)
        names = ("drums", "bass", "other", "vocals") if stems == "all" else (
            ("vocals", "no_vocals") if stems == "karaoke" else ("vocals", "no_bass"))
        artifacts = {"files": {n: f"{n}.{written}" for n in names}, "sizes": {n: 1 for n in names},
                     "format": {"name": written}, "mode": "links", "note": None, "preview": "preview.png"}
        checked = check_artifacts(asked, artifacts)
        assert set(checked.names) <= set(expected_uploads(asked, 30.0))


@pytest.mark.parametrize("fmt", ["mp3", "opus", "wav", "flac"])
def test_the_size_cap_admits_whatever_the_bot_accepts_and_grows_with_the_length(fmt):
    short, long = expected_uploads(job("vocals", fmt), 10.0), expected_uploads(job("vocals", fmt), 600.0)
    cap = short[f"vocals.{fmt}"]
    assert long[f"vocals.{fmt}"] > 50 * cap
    # The check the bot runs on a links delivery never allows more than the upload did.
    for bitrate in (128, 320):
        results = CheckedResults(files={"vocals": f"vocals.{fmt}"}, sizes={"vocals": 1},
                                 format=OutputFormat(name=fmt, mp3_bitrate_kbps=bitrate, opus_bitrate_kbps=bitrate),
                                 mode="links", note="", preview=None)
        assert max_stem_bytes(job("vocals", fmt, reserved_s=10.0, duration_s=10.0), results) <= cap
    # and nothing like the gigabyte a single policy used to allow per file
    assert cap < 10 * 1024 * 1024


def test_real_stems_fit_under_their_caps(tmp_path):
    """Noise compresses worst: a real encoder's files of it still fit."""
    seconds = 8.0
    for fmt, extra in (("mp3", ("-b:a", "320k")), ("opus", ("-b:a", "320k")), ("flac", ()),
                       ("wav", ("-c:a", "pcm_f32le"))):
        path = tmp_path / f"vocals.{fmt}"
        ffmpeg("-f", "lavfi", "-i", f"anoisesrc=d={seconds}:a=0.9:r=48000:seed=3", "-ac", "2", *extra, str(path))
        assert 0 < path.stat().st_size <= expected_uploads(job("vocals", fmt), seconds)[f"vocals.{fmt}"], fmt


def test_the_preview_is_capped_like_the_check_caps_it():
    assert expected_uploads(job("vocals"), 60.0)["preview.png"] == PREVIEW_MAX_BYTES
    small = job("vocals", attachment_size_limit=1024 * 1024)
    assert expected_uploads(small, 60.0)["preview.png"] == 1024 * 1024


def test_planned_duration_is_the_measured_length_else_the_longest_allowed():
    assert planned_duration(job(reserved_s=95.5), 1200.0) == 95.5
    assert planned_duration(job(reserved_s=0.0, limits={"max_track_s": 300}), 1200.0) == 300.0
    assert planned_duration(job(reserved_s=0.0, limits=None), 1200.0) == 1200.0


def test_the_transfer_window_covers_a_wait_and_the_attempts_and_ends():
    window = TransferWindow(seconds_per_audio_s=2.0, margin_s=1800.0)
    # a 3-minute song, 20-minute tracks allowed, 3 attempts: 1800 + 2 x (1200 + 3 x 180)
    assert window.seconds(180.0, 1200.0, 3) == 5280.0
    assert window.seconds(180.0, 1200.0, 3) < 24 * 3600  # what every URL used to get
    assert window.seconds(60.0, 1200.0, 1) < window.seconds(600.0, 1200.0, 1)


def test_a_mix_may_upload_only_the_mix_and_the_preview():
    options = RenderOptions(mix=(("bass", 100), ("vocals", 50)))
    mixed = job("bass,other,vocals", "mp3", render_options=options.to_column())
    assert set(expected_uploads(mixed, 60.0)) == {"mix.mp3", "mix.opus", "preview.png"}


def test_the_size_cap_follows_the_length_at_the_job_s_tempo():
    """Half speed makes files twice as long: the cap is the plain cap of a track twice as long."""
    slow = job("vocals", "flac", render_options=RenderOptions(tempo=50).to_column())
    assert expected_uploads(slow, 60.0)["vocals.flac"] == expected_uploads(job("vocals", "flac"), 120.0)["vocals.flac"]
    fast = job("vocals", "flac", render_options=RenderOptions(tempo=150, transpose=3).to_column())
    assert expected_uploads(fast, 60.0)["vocals.flac"] == expected_uploads(job("vocals", "flac"), 40.0)["vocals.flac"]
