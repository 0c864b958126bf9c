"""Audio I/O with ffmpeg: probe, decode to float32, encode stems, and the shared clip gain.

ffmpeg and ffprobe always run as separate processes with stdin closed, only the
`file` and `pipe` protocols, and an allowlist of demuxers, so that a user's file can
neither read other files (playlists, concat lists) nor reach the network. When they read
a user's file they also run under CPU-time and address-space limits (`spawn_limited`),
so that a file made to make a decoder spin or allocate cannot take the host with it, and
with a minimal environment (`core.helper_env`): no secret of the bot's is in theirs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ffmpeg
import numpy as np

from core.errors import (
    CorruptMediaError,
    EncodeError,
    NotAudioError,
    TooLargeError,
    TooLongError,
    TooShortError,
    UnsupportedMediaError,
)
from core.helper_env import helper_env

# Demuxers for audio and for video containers that carry audio. Playlist and list
# demuxers (hls, concat, image2, ...) are deliberately absent: they open other files.
ALLOWED_DEMUXERS = (
    "mp3,wav,w64,flac,ogg,matroska,webm,mov,mp4,m4a,3gp,3g2,mj2,aac,aiff,caf,"
    "wv,ape,asf,au,amr,ac3,eac3,dts,truehd,mlp,tta,avi,flv,mpeg,mpegts,oma,dsf,wsaud,voc,mpc,mpc8"
)
PROTOCOLS = "file,pipe"
PROBE_TIMEOUT_S = 30.0
# Decoding is bounded by the audio's length; this is a last resort against a stuck process.
DECODE_TIMEOUT_S = 600.0
ENCODE_TIMEOUT_S = 600.0
# ffmpeg runs beside a separation (decoding the next track, encoding the last one); a
# low priority keeps it from stalling the model's threads, which wait for each other at
# every parallel op. Measured on 2 cores: +9% separation time at nice 0, +6% at 19.
BACKGROUND_NICE = 19
# Limits for ffprobe/ffmpeg reading a user's file. Address space, not resident memory:
# ffmpeg maps about 300 MB of libraries before it reads a byte, and each decoder thread
# may reserve a malloc arena, so the cap is generous; it is there to stop runaway growth.
MEDIA_MEMORY_LIMIT_BYTES = 4 * 2**30
PROBE_CPU_LIMIT_S = 30
# Decoding 20 minutes of the slowest codecs (APE, 192 kHz multichannel) takes well under this.
DECODE_CPU_LIMIT_S = 300

WavDepth = Literal["16", "24", "float"]
OutputFormatName = Literal["wav", "flac", "mp3", "opus"]
OUTPUT_FORMATS: tuple[str, ...] = ("wav", "flac", "mp3", "opus")
# The ffmpeg audio filters a stem goes through as it is encoded, in order: each one's name
# and options (core.media.render: rubberband for tempo and transpose, then a limiter).
AudioFilters = tuple[tuple[str, dict[str, Any]], ...]


@dataclass(frozen=True)
class Limits:
    """What a user may send. Checked after probing, before decoding."""

    min_duration_s: float = 1.0
    max_duration_s: float = 20 * 60
    max_input_bytes: int = 250 * 1024 * 1024


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file's first audio stream."""

    size_bytes: int
    container: str
    codec: str
    sample_rate: int
    channels: int
    duration_s: float | None


@dataclass(frozen=True)
class OutputFormat:
    """How stems are written."""

    name: OutputFormatName = "mp3"
    mp3_bitrate_kbps: int = 320
    opus_bitrate_kbps: int = 160
    wav_depth: WavDepth = "16"

    @property
    def extension(self) -> str:
        return self.name

    @property
    def is_lossless(self) -> bool:
        return self.name in ("wav", "flac")


def _input_url(path: Path) -> str:
    # The explicit `file:` prefix stops a name like `concat:a|b` or `-i` from being
    # read as a protocol or an option.
    return "file:" + str(Path(path).resolve())


def _size_or_refuse(path: Path, limits: Limits) -> int:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise NotAudioError("file not found") from None
    if not Path(path).is_file():
        raise NotAudioError("not a regular file")
    if stat.st_size == 0:
        raise CorruptMediaError("the file is empty")
    if stat.st_size > limits.max_input_bytes:
        raise TooLargeError(
            f"the file is {_megabytes(stat.st_size)}, over the {_megabytes(limits.max_input_bytes)} limit"
        )
    return stat.st_size


def _megabytes(n: int) -> str:
    # 1024-based, labelled MB, as Discord shows sizes.
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


@functools.lru_cache(maxsize=1)
def _prlimit_command() -> str | None:
    """The `prlimit` program (util-linux) when it is present and allowed to work here."""
    path = shutil.which("prlimit")
    if path is None:
        return None
    try:
        done = subprocess.run([path, "--cpu=10", "--", "true"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=10, env=helper_env())
    except (OSError, subprocess.SubprocessError):
        return None
    return path if done.returncode == 0 else None


def spawn_limited(args: list[str], cpu_s: int, memory_bytes: int | None = None,
                  **popen: Any) -> subprocess.Popen[bytes]:
    """Start `args` with at most `cpu_s` seconds of CPU time and `memory_bytes` of address space.

    Past the CPU limit the kernel kills the process (SIGKILL; soft and hard limits are
    equal); past the memory limit its allocations fail. The limits are set by the
    `prlimit` wrapper before the program starts. Where that is missing they are set on the
    running child just after it starts: a short window, but never `preexec_fn`, which
    can deadlock a threaded program. Its environment is `helper_env()`, not ours.
    """
    memory = MEDIA_MEMORY_LIMIT_BYTES if memory_bytes is None else memory_bytes
    tool = _prlimit_command()
    if tool is not None:
        return subprocess.Popen([tool, f"--cpu={cpu_s}", f"--as={memory}", "--", *args], env=helper_env(), **popen)
    proc = subprocess.Popen(args, env=helper_env(), **popen)
    _limit_running(proc.pid, cpu_s, memory)
    return proc


def _limit_running(pid: int, cpu_s: int, memory_bytes: int) -> None:
    try:
        import resource  # noqa: PLC0415 - Unix-only; its ImportError is handled below

        resource.prlimit(pid, resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.prlimit(pid, resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, AttributeError, OSError, ValueError):  # not Linux, or the child is gone
        pass


def probe(path: Path, limits: Limits = Limits()) -> MediaInfo:
    """Probe `path` and refuse it early when it is not usable audio within `limits`."""
    size = _size_or_refuse(path, limits)
    args = [
        "ffprobe", "-v", "error", "-protocol_whitelist", PROTOCOLS,
        "-format_whitelist", ALLOWED_DEMUXERS,
        "-show_format", "-show_streams", "-of", "json", _input_url(path),
    ]
    proc = spawn_limited(args, PROBE_CPU_LIMIT_S, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CorruptMediaError("the file took too long to read; it may be damaged") from None
    if proc.returncode != 0:
        raise _probe_failure(stderr.decode("utf-8", "replace"), proc.returncode)
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        raise CorruptMediaError("the file could not be read as audio") from None

    fmt = data.get("format") or {}
    streams = data.get("streams") or []
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not audio:
        if any(s.get("codec_type") == "video" for s in streams):
            raise NotAudioError("the file has no audio track (video only)")
        raise NotAudioError("the file has no audio track")
    stream = audio[0]
    sample_rate = int(stream.get("sample_rate") or 0)
    channels = int(stream.get("channels") or 0)
    if sample_rate <= 0 or channels <= 0:
        raise CorruptMediaError("the audio track is damaged (no sample rate or channels)")

    duration = _first_float(fmt.get("duration"), stream.get("duration"))
    if duration is not None:
        if duration > limits.max_duration_s:
            raise TooLongError(
                f"the track is {format_duration(duration)} long, over the "
                f"{format_duration(limits.max_duration_s)} limit"
            )
        if duration < limits.min_duration_s:
            raise TooShortError(
                f"the track is {duration:.1f} s long; it must be at least {limits.min_duration_s:g} s"
            )
    return MediaInfo(
        size_bytes=size,
        container=str(fmt.get("format_name") or "unknown"),
        codec=str(stream.get("codec_name") or "unknown"),
        sample_rate=sample_rate,
        channels=channels,
        duration_s=duration,
    )


def _first_float(*values: str | float | None) -> float | None:
    for value in values:
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number) and number > 0:
            return number
    return None


def _probe_failure(stderr: str, returncode: int = 1) -> Exception:
    text = stderr.lower()
    if returncode in (-signal.SIGKILL, -signal.SIGXCPU):
        return CorruptMediaError("the file took too much work to read; it may be damaged")
    if _out_of_memory(text):
        return CorruptMediaError("the file needs too much memory to read; it may be damaged")
    if "not on whitelist" in text or "format_whitelist" in text:
        return UnsupportedMediaError("this kind of file is not supported (not an audio or video file)")
    if "invalid data found" in text or "could not find codec" in text:
        return CorruptMediaError("the file is not audio, or it is damaged")
    return CorruptMediaError("the file could not be read as audio")


def _out_of_memory(stderr_lower: str) -> bool:
    return "cannot allocate memory" in stderr_lower or "failed to map segment" in stderr_lower


def decode(
    path: Path,
    sample_rate: int,
    channels: int,
    limits: Limits = Limits(),
    info: MediaInfo | None = None,
) -> np.ndarray:
    """Decode the first audio stream of `path` to float32 of shape (channels, samples).

    Resamples to `sample_rate`, upmixes mono and downmixes multichannel to `channels`.
    Decoding stops just past the duration limit even if the container lies about its
    length, and a file whose decodable audio is far shorter than its header claims
    (a truncated download) is refused rather than separated in part.
    """
    buffer = bytearray()
    frames = decode_stream(path, sample_rate, channels, buffer.extend, limits, info)
    samples = np.frombuffer(memoryview(buffer)[:frames * channels * 4], dtype="<f4")
    return samples.reshape(-1, channels).T.copy()


def decode_stream(
    path: Path,
    sample_rate: int,
    channels: int,
    sink: Callable[[bytes], object],
    limits: Limits = Limits(),
    info: MediaInfo | None = None,
) -> int:
    """`decode`, handing the interleaved float32 (little-endian) bytes to `sink` as they
    come instead of keeping them: the same process, limits and checks. `sink` may get
    chunks that end inside a frame, and a last partial frame that is not audio; only the
    first `frames` (returned) whole frames count. A caller that keeps what `sink` got must
    discard it when this raises."""
    info = info or probe(path, limits)
    # Reading one second past the limit tells "exactly at the limit" from "over it".
    cap_s = limits.max_duration_s + 1.0
    stream = (
        ffmpeg.input(
            _input_url(path),
            protocol_whitelist=PROTOCOLS,
            format_whitelist=ALLOWED_DEMUXERS,
        )
        .output(
            "pipe:",
            map="0:a:0",
            t=f"{cap_s:.3f}",
            format="f32le",
            acodec="pcm_f32le",
            ac=channels,
            ar=sample_rate,
        )
        .global_args("-nostdin", "-v", "error")
    )
    args = stream.compile()
    proc = spawn_limited(args, DECODE_CPU_LIMIT_S, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    _lower_priority(proc.pid, BACKGROUND_NICE)
    assert proc.stdout is not None and proc.stderr is not None  # both PIPEs
    # Why we killed it, if we did: a kill we did not make is the CPU limit (or the OOM killer).
    stopped: list[str] = []

    def stop(why: str) -> None:
        stopped.append(why)
        proc.kill()

    max_bytes = int(cap_s * sample_rate) * channels * 4
    stderr_chunks: list[bytes] = []
    stderr = proc.stderr
    stderr_reader = threading.Thread(target=lambda: stderr_chunks.append(stderr.read()), daemon=True)
    stderr_reader.start()
    received = 0
    timer = threading.Timer(DECODE_TIMEOUT_S, stop, args=("timeout",))
    timer.start()
    try:
        while True:
            chunk = proc.stdout.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
            sink(chunk)
            if received > max_bytes:
                stop("cap")
                break
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr_reader.join(timeout=5)
    frame_bytes = channels * 4
    usable = received - received % frame_bytes
    decoded_s = usable / frame_bytes / sample_rate
    if decoded_s > limits.max_duration_s:
        raise TooLongError(
            f"the track is longer than the {format_duration(limits.max_duration_s)} limit"
        )
    if "timeout" in stopped:
        raise CorruptMediaError("decoding the file took too long; it may be damaged")
    if proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU) and not stopped:
        raise CorruptMediaError("the file took too much work to decode; it may be damaged")
    if proc.returncode != 0 and _out_of_memory(b"".join(stderr_chunks).decode("utf-8", "replace").lower()):
        raise CorruptMediaError("the file needs too much memory to decode; it may be damaged")
    if proc.returncode != 0 and usable == 0:
        raise CorruptMediaError("the audio could not be decoded; the file is damaged")
    if usable == 0:
        raise CorruptMediaError("the file contains no decodable audio")
    if decoded_s < limits.min_duration_s:
        raise TooShortError(f"the track is {decoded_s:.1f} s long; it must be at least {limits.min_duration_s:g} s")
    claimed = info.duration_s
    if claimed is not None and decoded_s < 0.75 * claimed and claimed - decoded_s > 2.0:
        raise CorruptMediaError(
            f"the file is truncated or damaged: only {format_duration(decoded_s)} of "
            f"{format_duration(claimed)} could be decoded"
        )
    if proc.returncode != 0 and (claimed is None or decoded_s < 0.98 * claimed - 1.0):
        # ffmpeg gave up part-way and we cannot tell how much is missing.
        raise CorruptMediaError("the audio could not be decoded completely; the file is damaged")
    return usable // frame_bytes


def clip_gain(stems: Mapping[str, np.ndarray] | list[np.ndarray], headroom: float = 1.01) -> float:
    """One gain for all stems of a track, so that none clips and they still sum to the mix.

    demucs rescales each stem on its own, which breaks `sum(stems) == mix`; one shared
    factor keeps the stems consistent with each other.
    """
    arrays = list(stems.values()) if isinstance(stems, Mapping) else list(stems)
    peak = max((float(np.max(np.abs(a))) if a.size else 0.0) for a in arrays) if arrays else 0.0
    return gain_for_peak(peak, headroom)


def sum_shortest(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The sum of `parts` (at least one) over the length of the shortest, as a new array."""
    parts = list(parts)
    length = min(part.shape[-1] for part in parts)
    total = parts[0][..., :length].copy()
    for part in parts[1:]:
        total += part[..., :length]
    return total


def gain_for_peak(peak: float, headroom: float = 1.01) -> float:
    """`clip_gain` for stems whose largest absolute sample is `peak` (for stems that are
    not in memory all at once)."""
    if peak * headroom <= 1.0:
        return 1.0
    return 1.0 / (peak * headroom)


def _encoder_args(fmt: OutputFormat) -> dict:
    if fmt.name == "wav":
        codec = {"16": "pcm_s16le", "24": "pcm_s24le", "float": "pcm_f32le"}[fmt.wav_depth]
        return {"acodec": codec, "format": "wav"}
    if fmt.name == "flac":
        # flac stores integers; "float" falls back to 24-bit, the most it keeps.
        if fmt.wav_depth == "16":
            return {"acodec": "flac", "sample_fmt": "s16", "format": "flac"}
        return {"acodec": "flac", "sample_fmt": "s32", "bits_per_raw_sample": 24, "format": "flac"}
    if fmt.name == "mp3":
        return {"acodec": "libmp3lame", "audio_bitrate": f"{fmt.mp3_bitrate_kbps}k", "format": "mp3"}
    if fmt.name == "opus":
        # libopus runs at 48 kHz; ffmpeg resamples on the way in.
        # Constrained VBR: unconstrained, tonal or percussive stems came out 1.4-1.8x the
        # target bitrate, which breaks planning against Discord's upload limit.
        return {"acodec": "libopus", "audio_bitrate": f"{fmt.opus_bitrate_kbps}k", "vbr": "constrained",
                "ar": 48000, "format": "opus"}
    raise ValueError(f"unknown output format {fmt.name!r}")


def _encode_one(audio: np.ndarray, sample_rate: int, path: Path, fmt: OutputFormat,
                audio_filters: AudioFilters = ()) -> None:
    block = sample_rate * 10
    chunks = (np.ascontiguousarray(audio[:, start:start + block].T, dtype="<f4").tobytes()
              for start in range(0, audio.shape[1], block))
    encode_stream(chunks, audio.shape[0], sample_rate, path, fmt, audio_filters)


def encode_stream(chunks: Iterable[bytes], channels: int, sample_rate: int, path: Path, fmt: OutputFormat,
                  audio_filters: AudioFilters = ()) -> None:
    """Encode interleaved float32 (little-endian) audio, given in chunks, to `path`,
    through `audio_filters` (see core.media.render)."""
    stream = ffmpeg.input("pipe:", format="f32le", ac=channels, ar=sample_rate)
    for name, options in audio_filters:
        stream = stream.filter(name, **options)
    args = (
        stream
        .output(str(path), **_encoder_args(fmt))
        .global_args("-v", "error", "-y")
        .compile()
    )
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=helper_env())
    _lower_priority(proc.pid, BACKGROUND_NICE)
    assert proc.stdin is not None and proc.stderr is not None  # both PIPEs
    stderr_chunks: list[bytes] = []
    stderr = proc.stderr
    reader = threading.Thread(target=lambda: stderr_chunks.append(stderr.read()), daemon=True)
    reader.start()
    try:
        for chunk in chunks:
            proc.stdin.write(chunk)
        proc.stdin.close()
        proc.wait(timeout=ENCODE_TIMEOUT_S)
    except (BrokenPipeError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    except BaseException:
        # The chunks failed (a temporary file could not be read): no half-written file.
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(timeout=5)
    if proc.returncode != 0:
        detail = b"".join(stderr_chunks).decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
        raise EncodeError(f"encoding {path.name} failed: {detail[0]}")


def _lower_priority(pid: int, nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except (OSError, AttributeError):  # not permitted, or not a POSIX system
        pass


def encode_stems(
    stems: Mapping[str, np.ndarray],
    sample_rate: int,
    folder: Path,
    fmt: OutputFormat = OutputFormat(),
    audio_filters: AudioFilters = (),
) -> dict[str, Path]:
    """Write each stem to `folder/<stem>.<ext>`, one ffmpeg process per stem, all at once,
    each through `audio_filters`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.{fmt.extension}" for name in stems}
    with ThreadPoolExecutor(max_workers=max(1, len(stems)), thread_name_prefix="encode") as pool:
        futures = [pool.submit(_encode_one, audio, sample_rate, paths[name], fmt, audio_filters)
                   for name, audio in stems.items()]
        for future in futures:
            future.result()
    return paths
