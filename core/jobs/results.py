"""Checking a job's results before the bot acts on them.

A worker reports a job's results in its row (`artifacts`: stem names, file names, sizes,
format, delivery mode, a note, a preview). In distributed mode that worker may be a
rented machine the operator does not control, so everything it wrote is data to check,
never a path to follow: the file names the bot opens are made here from the stem names
and the format, every file must be a regular file inside the job's folder, of the
requested kind of audio and of the track's length (at the job's tempo), within the sizes the upload plan
allows, and the note can mention nobody. The track's tempo and key (`checked_analysis`)
are kept only when they are a plausible number and one of the 24 key names. Delivery and the results cache act only on
what `check_artifacts` and `check_files` return, and, with an object store, only on the
bot's own copies of the files checked (`open_checked`).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, cast

from core.errors import BadRequestError, InputError
from core.jobs.job import Job
from core.media.analysis import KEY_NAMES, MAX_BPM, MIN_BPM, TrackAnalysis
from core.media.audio import OUTPUT_FORMATS, Limits, OutputFormat, OutputFormatName, WavDepth, probe
from core.media.render import MIX, RenderOptions
from core.media.upload_plan import MAX_ATTACHMENTS, estimate_size
from core.separation.published import BY_NAME
from core.separation.stems import KARAOKE, PUBLISHED_SOURCES

# What the user reads; the reason goes to the operator's log only.
RESULTS_REFUSED = "the worker's results did not check out; please try again"
PREVIEW = "preview.png"
PREVIEW_MAX_BYTES = 4 * 1024 * 1024
NOTE_MAX_CHARS = 300
ERROR_MAX_CHARS = 200
_BARE_AT = re.compile("@(?!\u200b)")
# A stem name becomes a file name, so only plain lowercase identifiers (Demucs's sources
# are drums, bass, other, vocals, guitar, piano; `no_x` is everything but x).
_STEM_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_STEMS = 16
# Encoders pad (mp3 frames, opus pre-skip) and resampling rounds: stems differ a little
# from the input's length.
DURATION_TOLERANCE_S = 1.0
DURATION_TOLERANCE = 0.02
_BITRATES_KBPS = range(32, 321)
_WAV_DEPTHS: tuple[WavDepth, ...] = ("16", "24", "float")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What ffprobe calls each output format's container and codec.
_CONTAINERS = {"mp3": "mp3", "opus": "ogg", "flac": "flac", "wav": "wav"}
_CODECS = {"mp3": ("mp3",), "opus": ("opus",), "flac": ("flac",),
           "wav": ("pcm_s16le", "pcm_s24le", "pcm_f32le")}


class ResultsRefused(Exception):
    """A job's results failed the check; `why` is for the operator's log."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class CheckedResults:
    """A job's results as the bot delivers them: every name made here."""

    files: dict[str, str]  # stem name -> `<stem>.<ext>`
    sizes: dict[str, int]
    format: OutputFormat
    mode: str  # "attach" or "links"
    note: str
    preview: str | None  # PREVIEW or None
    analysis: TrackAnalysis | None = None  # the track's tempo and key, when found and sane

    @property
    def names(self) -> list[str]:
        """Every file to open: the stems, then the preview."""
        return list(self.files.values()) + ([self.preview] if self.preview else [])

    def artifacts(self) -> dict[str, Any]:
        """The row's `artifacts`, rewritten from what was checked."""
        artifacts = {"files": dict(self.files), "sizes": dict(self.sizes), "format": asdict(self.format),
                     "mode": self.mode, "note": self.note or None, "preview": self.preview}
        if self.analysis is not None:
            artifacts["analysis"] = self.analysis.artifact()
        return artifacts


def requested_stems(spec: str) -> tuple[str, ...] | None:
    """The stems a request names, in order, as `core.separation.stems.parse_stems` makes
    them; None for `all`, whose names are the model's sources (the bot may not know them)."""
    spec = (spec or "all").strip().lower()
    if spec == "all":
        return None
    if spec == "karaoke":
        return KARAOKE
    outputs: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if name and name not in outputs:
            outputs.append(name)
    return tuple(outputs)


def job_render(job: Job) -> RenderOptions:
    """The job's tempo, transpose and mix as the bot stored them; ResultsRefused if the row
    holds something else (the bot wrote it, but a row is data)."""
    try:
        return RenderOptions.from_column(job.render_options)
    except BadRequestError as exc:
        raise ResultsRefused(f"render options {job.render_options!r:.80}: {exc.reason}") from None


def output_stems(job: Job) -> tuple[str, ...] | None:
    """The stems a job's results hold: `requested_stems`, or only `mix` for a mix."""
    if job_render(job).mix is not None:
        return (MIX,)
    return requested_stems(job.stems)


def rendered_duration(job: Job) -> float:
    """How long each result file is: the track's length (`expected_duration`) at the job's
    tempo (80% speed makes files 1.25 times as long)."""
    return job_render(job).rendered_length(expected_duration(job))


def check_artifacts(job: Job, artifacts: Any) -> CheckedResults:
    """Check what a worker reported for `job`, without its files. Raises ResultsRefused."""
    if not isinstance(artifacts, Mapping):
        raise ResultsRefused("no artifacts")
    reported = artifacts.get("files")
    if not isinstance(reported, Mapping) or not reported:
        raise ResultsRefused("no stems")
    stems = list(reported)
    _check_stem_names(job, stems)
    fmt = _check_format(job, artifacts.get("format"))
    mode = artifacts.get("mode")
    if mode not in ("attach", "links"):
        raise ResultsRefused(f"unknown delivery mode {mode!r}")
    if mode == "attach" and len(stems) > MAX_ATTACHMENTS:
        raise ResultsRefused(f"{len(stems)} stems cannot be attached to one message")
    sizes = artifacts.get("sizes")
    if not isinstance(sizes, Mapping) or set(sizes) != set(stems) or not all(
            type(size) is int and size >= 0 for size in sizes.values()):
        raise ResultsRefused("sizes do not match the stems")
    rendered_duration(job)
    # The bot names each file itself and never opens a name the worker wrote; an honest
    # worker writes these very names, so another one is refused as a sign of tampering.
    files = {stem: f"{stem}.{fmt.extension}" for stem in stems}
    if any(reported[stem] != name for stem, name in files.items()):
        raise ResultsRefused(f"file names {dict(reported)!r:.200} are not {files!r:.200}")
    preview = artifacts.get("preview")
    if preview not in (None, PREVIEW):
        raise ResultsRefused(f"preview {preview!r:.80} is not {PREVIEW}")
    return CheckedResults(
        files=files,
        sizes={stem: int(sizes[stem]) for stem in stems},
        format=fmt, mode=str(mode), note=safe_note(artifacts.get("note")),
        preview=preview, analysis=checked_analysis(artifacts),
    )


def checked_analysis(artifacts: Any) -> TrackAnalysis | None:
    """The track's tempo and key from a worker's `artifacts`, each kept only when sane: a
    finite BPM in MIN_BPM..MAX_BPM (rounded to 0.1), a key exactly one of KEY_NAMES.
    Anything else is dropped, not refused: the stems are still good. None when neither
    is left."""
    if not isinstance(artifacts, Mapping):
        return None
    reported = artifacts.get("analysis")
    if not isinstance(reported, Mapping):
        return None
    reported_bpm = reported.get("bpm")
    bpm: float | None = None
    # Not a bool (an int to Python); compared before float(), which a huge int would overflow.
    if (isinstance(reported_bpm, (int, float)) and not isinstance(reported_bpm, bool)
            and MIN_BPM <= reported_bpm <= MAX_BPM and math.isfinite(reported_bpm)):
        bpm = round(float(reported_bpm), 1)
    key = reported.get("key")
    if not (type(key) is str and key in KEY_NAMES):
        key = None
    if bpm is None and key is None:
        return None
    return TrackAnalysis(bpm=bpm, key=key)


def _check_stem_names(job: Job, stems: list[str]) -> None:
    if not all(isinstance(stem, str) and _STEM_NAME.fullmatch(stem) for stem in stems):
        raise ResultsRefused(f"stem names that are not plain names: {stems!r:.200}")
    expected = output_stems(job)
    if expected is None:
        # `all`: every source of the model (a chain's: of its cleaning model); none of them
        # is a `no_x` mix. A published model's sources are known; a model folder's own are
        # checked for form only.
        model = job.clean_model or job.model
        published = PUBLISHED_SOURCES.get(model)
        if published is None and job.clean_model is not None and model in BY_NAME:
            published = BY_NAME[model].stems
        if published is not None and (set(stems) != set(published) or len(stems) != len(published)):
            raise ResultsRefused(f"stems {stems!r:.200}, but {model}'s sources are {list(published)!r}")
        if len(stems) > MAX_STEMS or any(stem.startswith("no_") for stem in stems):
            raise ResultsRefused(f"stems {stems!r:.200} are not the sources of a model")
    elif set(stems) != set(expected) or len(stems) != len(expected):
        raise ResultsRefused(f"stems {stems!r:.200}, but the request was {list(expected)!r}")


def _check_format(job: Job, reported: Any) -> OutputFormat:
    """The format written: the requested one, or (for mp3) opus when the upload plan
    walked down its ladder to fit the upload limit."""
    names = {f.name for f in fields(OutputFormat)}
    if not isinstance(reported, Mapping) or not set(reported) <= names:
        raise ResultsRefused(f"format {reported!r:.200} is not a format")
    name = reported.get("name")
    allowed = {job.format, "opus"} if job.format == "mp3" else {job.format}
    if name not in OUTPUT_FORMATS or name not in allowed:
        raise ResultsRefused(f"format {name!r:.40}, but the request was {job.format!r}")
    mp3 = reported.get("mp3_bitrate_kbps", OutputFormat.mp3_bitrate_kbps)
    opus = reported.get("opus_bitrate_kbps", OutputFormat.opus_bitrate_kbps)
    depth = reported.get("wav_depth", OutputFormat.wav_depth)
    if type(mp3) is not int or type(opus) is not int or mp3 not in _BITRATES_KBPS or opus not in _BITRATES_KBPS:
        raise ResultsRefused("bitrates out of range")
    if depth not in _WAV_DEPTHS:
        raise ResultsRefused(f"wav depth {depth!r:.20}")
    return OutputFormat(name=cast("OutputFormatName", name), mp3_bitrate_kbps=mp3, opus_bitrate_kbps=opus,
                        wav_depth=cast("WavDepth", depth))


def expected_duration(job: Job) -> float:
    """The track's length: as the bot measured the input when it reserved the minutes,
    else as the run reported it."""
    duration = job.reserved_s if job.reserved_s and job.reserved_s > 0 else job.duration_s
    if duration is None or duration <= 0:
        raise ResultsRefused("the track's length is not known")
    if job.duration_s is None or abs(job.duration_s - duration) > _tolerance(duration):
        raise ResultsRefused(f"reported length {job.duration_s} s, but the input is {duration:.1f} s")
    return float(duration)


def _tolerance(duration_s: float) -> float:
    return max(DURATION_TOLERANCE_S, duration_s * DURATION_TOLERANCE)


def safe_note(note: Any, max_chars: int = NOTE_MAX_CHARS) -> str:
    """The note shown under the result: one line, capped, unable to mention anyone (a
    zero-width space after each `@` and `<#` breaks @everyone, @here, <@user>, <@&role>,
    <#channel>) and unable to hide a link behind other words (`[text](url)`)."""
    if not isinstance(note, str):
        return ""
    text = " ".join(note.split())
    if len(text) > max_chars:
        text = text[:max_chars - 1] + "…"
    # Idempotent: a note checked again (a delivery, then a cache hit) is not broken twice.
    return _BARE_AT.sub("@\u200b", text).replace("<#", "<\u200b#").replace("](", "]\u200b(")


def shown_error(job: Job) -> str:
    """Why a job ended, fit to show a user. A worker may have written it, so it gets the
    note's treatment, shorter."""
    return safe_note(job.error, ERROR_MAX_CHARS) or "unknown error"


def max_stem_bytes(job: Job, results: CheckedResults) -> int:
    """The largest stem the bot accepts: the server's upload limit when attached; when
    sent as links, `stem_bytes_cap` for the files' length (at the job's tempo)."""
    if results.mode == "attach":
        return job.attachment_size_limit
    return stem_bytes_cap(results.format, with_tolerance(rendered_duration(job)))


def stem_bytes_cap(fmt: OutputFormat, duration_s: float) -> int:
    """Well above what `estimate_size` says for one stem of `duration_s` in `fmt` (48 kHz
    stereo covers every model; lossy VBR and badly compressing lossless have room)."""
    if fmt.is_lossless:
        return int(estimate_size(OutputFormat(name="wav", wav_depth="float"), duration_s, 48000, 2) * 1.2)
    return 2 * estimate_size(fmt, duration_s, 48000, 2)


def with_tolerance(duration_s: float) -> float:
    """The longest a stem of a track of `duration_s` may be."""
    return duration_s + _tolerance(duration_s)


def check_files(job: Job, results: CheckedResults, folder: Path, job_dir: Path) -> CheckedResults:
    """Check the files of `results` in `folder` (blocking: it runs ffprobe); return the
    results with the sizes as found. Raises ResultsRefused."""
    root = folder.resolve()
    if root.parent != job_dir.resolve() or folder.is_symlink():
        raise ResultsRefused(f"the stems folder {folder} is not in the job's folder")
    cap = max_stem_bytes(job, results)
    duration = rendered_duration(job)
    sizes = {}
    for stem, name in results.files.items():
        path = _regular_file_inside(root, name)
        size = path.stat().st_size
        if size > cap:
            raise ResultsRefused(f"{name} is {size} bytes, over the {cap} allowed")
        _check_audio(path, results.format, duration, cap)
        sizes[stem] = size
    if results.preview:
        path = _regular_file_inside(root, results.preview)
        if path.stat().st_size > min(PREVIEW_MAX_BYTES, job.attachment_size_limit):
            raise ResultsRefused("the preview is too large")
        with open(path, "rb") as file:
            if file.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                raise ResultsRefused("the preview is not a PNG picture")
    return CheckedResults(results.files, sizes, results.format, results.mode, results.note, results.preview,
                          results.analysis)


def _regular_file_inside(root: Path, name: str) -> Path:
    path = root / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ResultsRefused(f"{name} is missing") from None
    # lstat: a symlink is refused as such, wherever it points.
    if not stat.S_ISREG(info.st_mode):
        raise ResultsRefused(f"{name} is not a regular file")
    if not path.resolve().is_relative_to(root):
        raise ResultsRefused(f"{name} is outside the stems folder")
    return path


def _check_audio(path: Path, fmt: OutputFormat, duration_s: float, cap: int) -> None:
    tolerance = _tolerance(duration_s)
    limits = Limits(min_duration_s=max(0.0, duration_s - tolerance), max_duration_s=duration_s + tolerance,
                    max_input_bytes=cap)
    try:
        info = probe(path, limits)
    except InputError as exc:
        raise ResultsRefused(f"{path.name}: {exc.reason}") from None
    if info.duration_s is None:
        raise ResultsRefused(f"{path.name}: no length")
    if _CONTAINERS[fmt.name] not in info.container.split(",") or info.codec not in _CODECS[fmt.name]:
        raise ResultsRefused(f"{path.name}: {info.container}/{info.codec}, not {fmt.name}")


class StemsStorage(Protocol):
    """What the check needs of storage (core.storage.local.LocalStorage and its S3 kin)."""

    def job_dir(self, job_id: int) -> Path: ...

    def open_stems(self, job_id: int, names: list[str]) -> Any: ...

    async def keep_checked(self, job_id: int, folder: Path, names: list[str]) -> None: ...


@asynccontextmanager
async def open_checked(storage: StemsStorage, job: Job) -> AsyncIterator[tuple[Path, CheckedResults]]:
    """The job's stems on this disk, checked, with the results to deliver from them.
    The files checked are the very files sent: in distributed mode, this download, which
    then becomes the bot's own copy that download links and the results cache use."""
    results = check_artifacts(job, job.artifacts)
    async with storage.open_stems(job.id, results.names) as folder:
        checked = await asyncio.to_thread(check_files, job, results, Path(folder), storage.job_dir(job.id))
        await storage.keep_checked(job.id, Path(folder), checked.names)
        yield folder, checked
