"""core.jobs.results: a worker's reported results, checked with real files and ffprobe."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from core.jobs.job import Job
from core.jobs.results import (
    ERROR_MAX_CHARS,
    NOTE_MAX_CHARS,
    PREVIEW,
    CheckedResults,
    ResultsRefused,
    check_artifacts,
    check_files,
    checked_analysis,
    safe_note,
    shown_error,
)
from core.media.render import RenderOptions
from tests.support.media import music

SECONDS = 3.0
STEMS = ("drums", "bass", "other", "vocals")
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Genuine mp3, opus and wav stems of a 3 s track, made once."""
    folder = tmp_path_factory.mktemp("made")
    for stem in STEMS:
        music(folder / f"{stem}.mp3", seconds=SECONDS, extra=("-b:a", "128k"))
        music(folder / f"{stem}.opus", seconds=SECONDS, rate=48000, extra=("-b:a", "64k"))
        music(folder / f"{stem}.wav", seconds=SECONDS)
    music(folder / "short.mp3", seconds=1.0, extra=("-b:a", "128k"))
    return folder


@pytest.fixture
def job_dir(tmp_path, made) -> Path:
    """A job folder whose stems folder holds genuine mp3 stems and a preview."""
    stems = tmp_path / "jobs" / "7" / "stems"
    stems.mkdir(parents=True)
    for stem in STEMS:
        shutil.copy(made / f"{stem}.mp3", stems)
    (stems / PREVIEW).write_bytes(PNG)
    return stems.parent


def job(**fields) -> Job:
    values = dict(id=7, model="tiny", stems="all", format="mp3", duration_s=SECONDS, reserved_s=SECONDS,
                  attachment_size_limit=10 * 1024 * 1024)
    values.update(fields)
    return Job(**values)


def artifacts(fmt: str = "mp3", stems=STEMS, **changes) -> dict:
    reported = {"files": {s: f"{s}.{fmt}" for s in stems}, "sizes": dict.fromkeys(stems, 1),
                "format": {"name": fmt, "mp3_bitrate_kbps": 128, "opus_bitrate_kbps": 64, "wav_depth": "16"},
                "mode": "attach", "note": None, "preview": PREVIEW}
    reported.update(changes)
    return reported


def check(the_job: Job, reported: dict, job_dir: Path) -> CheckedResults:
    return check_files(the_job, check_artifacts(the_job, reported), job_dir / "stems", job_dir)


def refused(the_job: Job, reported, job_dir: Path) -> str:
    with pytest.raises(ResultsRefused) as caught:
        check(the_job, reported, job_dir)
    return caught.value.why


# -- genuine results -------------------------------------------------------------------


def test_genuine_results_pass_with_the_real_sizes_and_names_made_by_the_bot(job_dir):
    checked = check(job(), artifacts(), job_dir)
    assert checked.files == {s: f"{s}.mp3" for s in STEMS}
    assert checked.sizes == {s: (job_dir / "stems" / f"{s}.mp3").stat().st_size for s in STEMS}
    assert checked.names == [f"{s}.mp3" for s in STEMS] + [PREVIEW]
    assert checked.artifacts()["format"]["name"] == "mp3" and checked.mode == "attach"


def test_requested_stems_and_a_downgrade_to_opus_pass(job_dir, made):
    for stem in STEMS:
        shutil.copy(made / f"{stem}.opus", job_dir / "stems")
    karaoke = artifacts("opus", stems=("vocals", "no_vocals"))
    shutil.copy(made / "vocals.opus", job_dir / "stems" / "no_vocals.opus")
    assert check(job(stems="karaoke"), karaoke, job_dir).files == {"vocals": "vocals.opus",
                                                                   "no_vocals": "no_vocals.opus"}
    assert list(check(job(stems="bass, drums"), artifacts(stems=("bass", "drums")), job_dir).files) == [
        "bass", "drums"]


def test_links_mode_allows_files_over_the_attachment_limit(job_dir):
    assert check(job(attachment_size_limit=10_000), artifacts(mode="links"), job_dir).mode == "links"


# -- hostile results -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/proc/self/environ", "../../.env", "drums.mp3/../../x", "other.mp3"])
def test_a_file_name_other_than_the_stem_s_own_is_refused(job_dir, name):
    reported = artifacts()
    reported["files"]["drums"] = name
    assert "file names" in refused(job(), reported, job_dir)


def test_a_preview_name_other_than_preview_png_is_refused(job_dir):
    assert "preview" in refused(job(), artifacts(preview="../../.env"), job_dir)


def test_a_symlink_pointing_outside_is_refused(job_dir, tmp_path):
    secret = tmp_path / "secret.mp3"
    secret.write_bytes(b"TOKEN=secret\n")
    stems = job_dir / "stems"
    (stems / "drums.mp3").unlink()
    os.symlink(secret, stems / "drums.mp3")
    assert "not a regular file" in refused(job(), artifacts(), job_dir)


def test_a_symlink_to_a_genuine_stem_is_refused_too(job_dir, made):
    stems = job_dir / "stems"
    (stems / "drums.mp3").unlink()
    os.symlink(made / "drums.mp3", stems / "drums.mp3")
    assert "not a regular file" in refused(job(), artifacts(), job_dir)


def test_a_stems_folder_that_is_a_symlink_is_refused(job_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (job_dir / "stems").rename(elsewhere)
    os.symlink(elsewhere, job_dir / "stems")
    assert "not in the job's folder" in refused(job(), artifacts(), job_dir)


def test_an_extra_stem_is_refused(job_dir):
    assert "request" in refused(job(stems="vocals"), artifacts(stems=("vocals", "drums")), job_dir)
    assert "request" in refused(job(stems="karaoke"), artifacts(stems=("vocals", "no_vocals", "drums")), job_dir)
    # `all` is the model's sources: never a `no_x` mix, never a name that is not a plain name.
    assert "sources" in refused(job(), artifacts(stems=(*STEMS, "no_vocals")), job_dir)
    assert "plain names" in refused(job(), artifacts(stems=("drums", "../x")), job_dir)


def test_all_stems_of_a_published_model_are_its_sources(job_dir):
    """`all` from htdemucs is exactly drums, bass, other, vocals; a model folder's own model
    (here `tiny`) is checked for the form of its names only."""
    assert list(check(job(model="htdemucs"), artifacts(), job_dir).files) == list(STEMS)
    assert "sources" in refused(job(model="htdemucs"), artifacts(stems=("drums", "bass", "other")), job_dir)
    shutil.copy(job_dir / "stems" / "bass.mp3", job_dir / "stems" / "piano.mp3")
    assert "sources" in refused(job(model="htdemucs"), artifacts(stems=(*STEMS, "piano")), job_dir)
    assert "sources" in refused(job(model="htdemucs_6s"), artifacts(), job_dir)


def test_a_missing_stem_is_refused(job_dir):
    assert "request" in refused(job(stems="bass,drums"), artifacts(stems=("bass",)), job_dir)
    (job_dir / "stems" / "bass.mp3").unlink()
    assert "missing" in refused(job(), artifacts(), job_dir)


def test_another_format_than_requested_is_refused(job_dir, made):
    for stem in STEMS:
        shutil.copy(made / f"{stem}.wav", job_dir / "stems")
    assert "request" in refused(job(), artifacts("wav"), job_dir)
    assert "request" in refused(job(format="flac"), artifacts("wav"), job_dir)
    weird = artifacts()
    weird["format"] = {"name": "mp3", "__class__": "x"}
    assert "not a format" in refused(job(), weird, job_dir)


def test_a_file_of_another_kind_than_its_extension_is_refused(job_dir, made):
    shutil.copy(made / "vocals.wav", job_dir / "stems" / "vocals.mp3")
    assert "not mp3" in refused(job(), artifacts(), job_dir)


def test_an_oversized_file_is_refused(job_dir):
    size = (job_dir / "stems" / "drums.mp3").stat().st_size
    assert "over the" in refused(job(attachment_size_limit=size - 1), artifacts(), job_dir)
    # As links: capped by what the track's length can take, not by the upload limit.
    with open(job_dir / "stems" / "drums.mp3", "ab") as file:
        file.write(b"\0" * 2 * 1024 * 1024)
    assert "over the" in refused(job(), artifacts(mode="links"), job_dir)


def test_non_audio_named_vocals_mp3_is_refused(job_dir):
    (job_dir / "stems" / "vocals.mp3").write_bytes(b"<html>not a song</html>\n" * 400)
    assert "vocals.mp3" in refused(job(), artifacts(), job_dir)


def test_a_stem_of_another_length_than_the_track_is_refused(job_dir, made):
    shutil.copy(made / "short.mp3", job_dir / "stems" / "vocals.mp3")
    assert "vocals.mp3" in refused(job(), artifacts(), job_dir)
    # Nor may the run report a length the bot did not measure.
    assert "length" in refused(job(duration_s=SECONDS * 3), artifacts(), job_dir)


def test_a_preview_that_is_not_a_png_is_refused(job_dir):
    (job_dir / "stems" / PREVIEW).write_bytes(b"TOKEN=secret\n")
    assert "PNG" in refused(job(), artifacts(), job_dir)


@pytest.mark.parametrize("reported", [None, [], {"files": {}}, {"files": "x"}])
def test_malformed_artifacts_are_refused(job_dir, reported):
    refused(job(), reported, job_dir)


def test_an_unknown_mode_or_sizes_not_matching_are_refused(job_dir):
    assert "mode" in refused(job(), artifacts(mode="../x"), job_dir)
    assert "sizes" in refused(job(), artifacts(sizes={"drums": 1}), job_dir)


# -- the note ------------------------------------------------------------------------------


def test_the_note_mentions_nobody_and_is_capped():
    note = safe_note("@everyone <@123> <@!124> <@&456> <#789> @here look")
    for mention in ("@everyone", "@here", "<@123>", "<@!124>", "<@&456>", "<#789>"):
        assert mention not in note
    assert "look" in note
    assert len(safe_note("x" * 5000)) == NOTE_MAX_CHARS
    assert safe_note(None) == safe_note(["@everyone"]) == ""
    # checked again (a delivery, then a cache hit): the same text, not a second break
    assert safe_note(note) == note


def test_a_note_cannot_hide_a_link_behind_words():
    note = safe_note("[your stems](https://evil.example/login) are ready")
    assert "](" not in note and "evil.example" in note


def test_a_job_s_error_is_shown_like_a_note_but_shorter():
    """A worker writes `job.error` too: the bot shows it capped, mentioning nobody."""
    shown = shown_error(job(error="@everyone <@123> " + "x" * 1000))
    assert "@everyone" not in shown and "<@123>" not in shown
    assert len(shown.replace("\u200b", "")) == ERROR_MAX_CHARS
    assert shown_error(job(error=None)) == "unknown error"
    assert shown_error(job(error="the track is too long")) == "the track is too long"


def test_the_checked_note_is_the_safe_one(job_dir):
    checked = check(job(), artifacts(note="@everyone files were large"), job_dir)
    assert "@everyone" not in checked.note and "files were large" in checked.note


# -- tempo, transpose and mixes (core.media.render) ---------------------------------------------


def test_stems_at_another_tempo_are_as_long_as_the_track_at_that_tempo(job_dir, tmp_path):
    """Half speed makes files twice as long: the check expects that length, and still
    refuses the track's own length (stems that were not stretched)."""
    slower = job(render_options=RenderOptions(tempo=50).to_column())
    assert "at least 5 s" in refused(slower, artifacts(), job_dir)  # SECONDS long: not stretched
    for stem in STEMS:
        music(job_dir / "stems" / f"{stem}.mp3", seconds=SECONDS / 0.5, extra=("-b:a", "128k"))
    assert check(slower, artifacts(), job_dir).files == {s: f"{s}.mp3" for s in STEMS}
    assert "over the 0:04 limit" in refused(job(), artifacts(), job_dir)  # and a plain job wants SECONDS
    # Transposing alone keeps the length.
    transposed = job(render_options=RenderOptions(transpose=5).to_column())
    assert "over the 0:04 limit" in refused(transposed, artifacts(), job_dir)


def test_a_mix_job_has_one_file_named_mix(job_dir, made):
    mixed = job(stems="bass,other,vocals",
                render_options=RenderOptions(mix=(("bass", 100), ("other", 100), ("vocals", 50))).to_column())
    shutil.copy(made / "vocals.mp3", job_dir / "stems" / "mix.mp3")
    assert check(mixed, artifacts(stems=("mix",)), job_dir).files == {"mix": "mix.mp3"}
    # The stems it was mixed from are not a mix's results, nor a mix another job's.
    assert "request was ['mix']" in refused(mixed, artifacts(stems=("bass", "other", "vocals")), job_dir)
    assert "stems ['mix']" in refused(job(stems="bass,other,vocals"), artifacts(stems=("mix",)), job_dir)


def test_unreadable_render_options_refuse_the_results(job_dir):
    assert "render options" in refused(job(render_options='{"tempo": 900}'), artifacts(), job_dir)
# -- the track's tempo and key ------------------------------------------------------------


def test_a_sane_tempo_and_key_pass_and_are_kept_through_the_file_check_and_the_cache(job_dir):
    checked = check(job(), artifacts(analysis={"bpm": 123.04, "key": "A minor"}), job_dir)
    assert checked.analysis is not None
    assert (checked.analysis.bpm, checked.analysis.key) == (123.0, "A minor")
    # A cache hit delivers from `artifacts()`, checked again.
    assert checked.artifacts()["analysis"] == {"bpm": 123.0, "key": "A minor"}
    again = check_artifacts(job(), checked.artifacts())
    assert again.analysis == checked.analysis
    assert check(job(), artifacts(analysis={"bpm": 30, "key": "F# major"}), job_dir).artifacts()["analysis"] == {
        "bpm": 30.0, "key": "F# major"}


@pytest.mark.parametrize("hostile", [
    {"bpm": float("nan"), "key": "@everyone"},
    {"bpm": float("inf"), "key": "<@123456789> C major"},
    {"bpm": 1e9, "key": "C major " + "x" * 10_000},
    {"bpm": 10 ** 400, "key": "c major"},
    {"bpm": -120, "key": "H minor"},
    {"bpm": 29.9, "key": "Db major"},
    {"bpm": 300.1, "key": ["C major"]},
    {"bpm": True, "key": None},
    {"bpm": "120", "key": 7},
    {"bpm": [120], "key": {"C": "major"}},
])
def test_a_hostile_tempo_or_key_is_dropped_and_the_stems_still_delivered(job_dir, hostile):
    checked = check(job(), artifacts(analysis=hostile), job_dir)
    assert checked.analysis is None
    assert "analysis" not in checked.artifacts()
    assert checked.files == {s: f"{s}.mp3" for s in STEMS}


def test_only_the_sane_half_of_an_analysis_is_kept(job_dir):
    checked = check(job(), artifacts(analysis={"bpm": float("nan"), "key": "G major"}), job_dir)
    assert checked.analysis is not None and (checked.analysis.bpm, checked.analysis.key) == (None, "G major")
    assert checked.artifacts()["analysis"] == {"key": "G major"}
    checked = check(job(), artifacts(analysis={"bpm": 87.66, "key": "@here"}), job_dir)
    assert checked.analysis is not None and (checked.analysis.bpm, checked.analysis.key) == (87.7, None)


@pytest.mark.parametrize("reported", [None, "120 BPM", ["C major"], 120])
def test_an_analysis_that_is_not_a_mapping_is_dropped(job_dir, reported):
    assert check(job(), artifacts(analysis=reported), job_dir).analysis is None
    assert checked_analysis(artifacts(analysis=reported)) is None
    assert checked_analysis(None) is None and checked_analysis("analysis") is None


def test_a_chains_stems_are_its_cleaning_models_sources(job_dir):
    """`/split clean:` runs htdemucs, then a listed de-reverb model on its vocals: the stems
    must be the de-reverb model's, not htdemucs's."""
    chain = job(model="htdemucs", clean_model="dereverb_mel_band_roformer_anvuew_sdr_19.1729")
    assert "sources" in refused(chain, artifacts(), job_dir)
    for stem in ("noreverb", "reverb"):
        shutil.copy(job_dir / "stems" / "vocals.mp3", job_dir / "stems" / f"{stem}.mp3")
    assert list(check(chain, artifacts(stems=("noreverb", "reverb")), job_dir).files) == ["noreverb", "reverb"]
    assert "sources" in refused(job(model="htdemucs"), artifacts(stems=("noreverb", "reverb")), job_dir)
