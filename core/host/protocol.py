"""What the bot and its model host say to each other: the host's configuration, the jobs
it is given, the events it reports, and the board of jobs to cancel. Plain data, so it
pickles across `spawn` (the events are module-level dataclasses for the same reason)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import StembotError
from core.separation.blockwise import BLOCK_S, BLOCKS_ABOVE_S

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext


@dataclass(frozen=True)
class HostConfig:
    """What the host needs to start; plain data, so it pickles across `spawn`."""

    model: str
    model_dir: str | None
    device: str = "auto"
    shifts: int = 1
    overlap: float = 0.25
    segment: float | None = None
    precision: str = "fp32"
    min_duration_s: float = 1.0
    max_duration_s: float = 20 * 60
    max_input_bytes: int = 250 * 1024 * 1024
    warm_up: bool = True
    max_loaded_models: int = 2
    # CPU threads for the model (None: PyTorch's default, every core). Several model
    # hosts on one machine must share the cores: oversubscribed, PyTorch's spinning
    # threads slowed two 2-thread hosts on 2 cores about 7x (bench/workers.py).
    threads: int | None = None
    # Tracks longer than `blocks_above_s` are decoded, separated and encoded in blocks of
    # `block_s` seconds, in bounded memory (core.separation.blockwise); None: always whole tracks.
    block_s: float | None = BLOCK_S
    blocks_above_s: float = BLOCKS_ABOVE_S
    # Added to the host's niceness: on a shared CPU the bot's event loop (and a worker's
    # heartbeats) then run first, and the separation takes what is left.
    nice: int = 0
    # Jobs in the host at once, their segments batched together (None: 4 on a GPU, 1 on
    # a CPU, where batching and overlapping encodes were measured slower).
    batch_jobs: int | None = None
    # Segments per forward pass when several jobs share the host.
    batch_segments: int = 16
    # What runs the network on a CPU (auto, torch, onnx, openvino), and where exports are kept.
    backend: str = "torch"
    export_dir: str | None = None
    log_level: int = logging.INFO


@dataclass(frozen=True)
class JobSpec:
    """One separation, as the host receives it."""

    job_id: int
    input_path: str
    stems_dir: str
    model: str
    stems: str  # of `clean_model` when there is one
    format: str
    render: str = ""
    # A chain: this model runs on the vocals of `model` (`/split clean:`).
    clean_model: str | None = None  # tempo, transpose, mix: core.media.render.RenderOptions.to_column()
    mp3_bitrate_kbps: int = 320
    attachment_limit: int = 10 * 1024 * 1024
    links_available: bool = False
    link_valid_hours: float = 24.0
    preview: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class CancelBoard:
    """The ids of jobs to stop, shared by a worker and its host (a small ring in shared
    memory; a host holds at most a few jobs)."""

    SIZE = 32

    def __init__(self, ctx: BaseContext):
        self._ids = ctx.Array("q", self.SIZE)
        self._next = ctx.Value("i", 0)

    def add(self, job_id: int) -> None:
        with self._ids.get_lock():
            if job_id not in self._ids[:]:
                self._ids[self._next.value % self.SIZE] = job_id
                self._next.value += 1

    def discard(self, job_id: int) -> None:
        with self._ids.get_lock():
            for index, value in enumerate(self._ids[:]):
                if value == job_id:
                    self._ids[index] = 0

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids[:]


# -- what the host reports -----------------------------------------------------------------


@dataclass(frozen=True)
class JobResult:
    """A separated job's stems on disk and how to deliver them."""

    files: dict[str, str]  # stem name -> file name in the job's stems folder
    sizes: dict[str, int]  # stem name -> bytes
    duration_s: float
    separation_s: float
    format: dict[str, Any]  # the OutputFormat written, as a dict (it goes into the job's row)
    mode: str  # "attach" or "links"
    note: str | None
    preview: str | None  # file name of the waveform picture, if drawn
    batched_jobs: int | None = None  # most jobs in one forward pass with it (a batching host only)
    analysis: dict[str, Any] | None = None  # the track's {"bpm": ..., "key": ...}, when found

    def artifacts(self) -> dict[str, Any]:
        """What the job's row keeps and the bot delivers from."""
        artifacts = {"files": self.files, "sizes": self.sizes, "format": self.format, "mode": self.mode,
                     "note": self.note, "preview": self.preview}
        if self.analysis:
            artifacts["analysis"] = self.analysis
        return artifacts


@dataclass(frozen=True)
class ReadyEvent:
    """The host loaded and warmed up its model; it takes `capacity` jobs at once."""

    model: str
    device: str
    pid: int
    load_s: float
    warmup_s: float
    capacity: int
    backend: str = "torch"  # what runs the network (core.separation.onnx_backend)


@dataclass(frozen=True)
class FatalEvent:
    """The host could not start (the model cannot be loaded, no such device)."""

    reason: str
    kind: str

    @classmethod
    def of(cls, exc: BaseException) -> FatalEvent:
        return cls(failure_reason(exc), getattr(exc, "kind", "error"))


@dataclass(frozen=True)
class StageEvent:
    """A job entered a stage: decoding, separating (with its length), encoding."""

    job: int
    stage: str
    duration_s: float | None = None


@dataclass(frozen=True)
class ProgressEvent:
    """How far a job's separation is, from 0 to 1."""

    job: int
    fraction: float


@dataclass(frozen=True)
class DoneEvent:
    """A job ended with its stems on disk."""

    job: int
    result: JobResult


@dataclass(frozen=True)
class FailedEvent:
    """A job ended in failure, said in words for the user."""

    job: int
    reason: str
    kind: str

    @classmethod
    def of(cls, job: int, exc: BaseException) -> FailedEvent:
        return cls(job, failure_reason(exc), getattr(exc, "kind", "error"))


@dataclass(frozen=True)
class CancelledEvent:
    """A job stopped because it was cancelled."""

    job: int


@dataclass(frozen=True)
class DiedEvent:
    """The host process is gone (said by the bot's side, which saw it die)."""

    exitcode: int | None


JobProgressEvent = StageEvent | ProgressEvent
JobEndEvent = DoneEvent | FailedEvent | CancelledEvent
HostEvent = ReadyEvent | FatalEvent | JobProgressEvent | JobEndEvent | DiedEvent


class EventSink(Protocol):
    """Where a host puts its events (a multiprocessing queue to the bot)."""

    def put(self, event: HostEvent, /) -> None: ...


def failure_reason(exc: BaseException) -> str:
    """A failure in words for the user: a StembotError's reason, else no internals."""
    if isinstance(exc, StembotError):
        return exc.reason
    return f"internal error ({exc.__class__.__name__})"
