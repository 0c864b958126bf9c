"""HTDemucs's network run by ONNX Runtime or OpenVINO on a CPU, demucs doing the rest.

`torch.onnx` cannot export htdemucs's complex STFT, so the exported graph is the part of
demucs's own `HTDemucs.forward` between its spectrogram and its inverse: traced with the
model's STFT, magnitude, mask and iSTFT steps stood in for by the graph's inputs and
outputs (`_Network`). At run time `ExportedHTDemucs` (an HTDemucs without layers, so that
demucs's `apply_model`, `BagOfModels` and stembot's plans treat it as the model it
replaces) calls demucs's own `_spec`, `_magnitude`, `_mask` and `_ispec` around the
runtime: segments, overlap, shifts and bag weights stay demucs's.

An export is made once per network and kept in a cache folder, named by a key that
hashes the weights, the model's configuration and the exporter's and runtimes'
versions: changed weights or versions give another name, so a stale export is never
used. Beside each export, the SHA-256 of its bytes; an export that does not match it
(truncated, damaged) is rebuilt. Hashing 174 MB on every load costs a few tenths of a
second, so a match is recorded with the file's size, inode, mtime and ctime (`.checked`):
while none of them changed, the bytes are the ones that were hashed; any write to the file
(or its replacement) changes its ctime, which no user can set back, and the next load
hashes it again. `backend="auto"` measures the candidates on one segment
once per network, machine and thread count, and remembers the fastest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import platform
import queue
import statistics
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs

from core.errors import ModelUnavailableError
from core.storage.file_digest import file_sha256

if TYPE_CHECKING:
    from demucs.repo import AnyModel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "openvino")
# The exported graph's contract (inputs, outputs, what stays outside): bump when it changes.
EXPORT_FORMAT = 1
OPSET = 17
# A runtime must be at least this much faster than PyTorch on the probe to be chosen:
# below it the difference is within this kind of machine's noise.
AUTO_MARGIN = 0.97
PROBE_ROUNDS = 3
# A file's check is recorded only once it has been left alone this long (see _record_check).
CHECK_SETTLE_S = 2.0
# Segments computed at once by default per runtime (measured on 2 cores, docs/performance.md).
STREAMS_DEFAULT = {"openvino": 2}

# A runtime's call: (mix, magnitude spectrogram) of one segment -> (time branch, spectrogram branch).
Runner = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def default_export_dir(model_dir: Path | None) -> Path:
    """Next to the weights when the model folder is writable, else the user's cache."""
    if model_dir is not None and os.access(model_dir, os.W_OK):
        return model_dir / ".stembot-exports"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "stembot" / "exports"


# -- the exported graph -------------------------------------------------------------


class _Network(torch.nn.Module):
    """demucs's HTDemucs.forward with its STFT-side steps replaced by this module's inputs
    and outputs: (mix, magnitude) -> (time-branch output, spectrogram-branch output)."""

    def __init__(self, model: HTDemucs):
        super().__init__()
        self.model = model

    def forward(self, mix: torch.Tensor, mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []

        def keep_mask(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            captured.append(m)
            return z

        with _replaced(self.model, _spec=lambda x: mag, _magnitude=lambda z: z, _mask=keep_mask,
                       _ispec=lambda z, length: torch.zeros((), dtype=mix.dtype)):
            time_branch = self.model(mix)  # its time branch + the zero that stands for the iSTFT
        return time_branch, captured[0]


@contextlib.contextmanager
def _replaced(model: HTDemucs, **methods: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Instance attributes shadowing `model`'s methods, for the length of an export."""
    for name, method in methods.items():
        model.__dict__[name] = method
    try:
        yield
    finally:
        for name in methods:
            model.__dict__.pop(name, None)


def _segment_length(model: HTDemucs) -> int:
    return int(model.segment * model.samplerate)


def _example(model: HTDemucs, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment of noise and its magnitude spectrogram, the network's inputs."""
    generator = torch.Generator().manual_seed(seed)
    mix = 0.1 * torch.randn(1, model.audio_channels, _segment_length(model), generator=generator)
    return mix, model._magnitude(model._spec(mix))


def supports(model: object) -> bool:
    """Whether this backend can run `model`: an HTDemucs with complex-as-channels output
    (every published htdemucs); others (Wiener-filtered, older Demucs, subclasses with a
    forward of their own) stay on PyTorch."""
    return (isinstance(model, HTDemucs) and type(model).forward is HTDemucs.forward  # demucs's own network
            and bool(model.cac))


_KEYS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def export_key(model: HTDemucs) -> str:
    """What the export of `model` depends on: its weights and configuration, the export's
    format and opset, torch's, ONNX Runtime's and OpenVINO's versions. Hashed once per
    loaded model (0.2 s for htdemucs's 168 MB): a loaded model's weights do not change."""
    if model not in _KEYS:
        _KEYS[model] = _hash_of(model)
    return _KEYS[model]


def _hash_of(model: HTDemucs) -> str:
    digest = hashlib.sha256()
    args, kwargs = getattr(model, "_init_args_kwargs", ((), {}))
    versions = {name: _version(name) for name in ("torch", "onnxruntime", "openvino")}
    digest.update(repr((EXPORT_FORMAT, OPSET, versions, args, sorted(kwargs.items()))).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "-"


def export(model: HTDemucs, path: Path) -> None:
    """Export `model`'s network to `path` (written whole, then renamed into place), and
    the SHA-256 of its bytes beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    mix, mag = _example(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The attention fast path's fused op has no ONNX export; the plain path's ops do.
    torch.backends.mha.set_fastpath_enabled(False)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), _quiet_export():
            torch.onnx.export(_Network(model.eval()), (mix, mag), str(tmp), input_names=["mix", "mag"],
                              output_names=["time", "spec"], opset_version=OPSET, dynamo=False)
        _sum_path(path).write_text(file_sha256(tmp))
        tmp.chmod(0o644)  # mkstemp's 0600 would keep other users of a shared model folder out
        os.replace(tmp, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        tmp.unlink(missing_ok=True)
    log.info("exported %s in %.1f s", path.name, time.monotonic() - started)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The tracer warns about every Python branch on a shape in demucs's code; the shapes
    are fixed (one segment), so the branches are too."""
    import warnings  # noqa: PLC0415 - only while exporting

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _check_path(path: Path) -> Path:
    return path.with_name(path.name + ".checked")


def _file_identity(path: Path) -> dict[str, int]:
    """What changes when a file's bytes may have changed: a write (mtime, ctime), a
    truncation (size), a replacement (inode, device). ctime cannot be set back by a user."""
    stat = path.stat()
    return {"size": stat.st_size, "ino": stat.st_ino, "dev": stat.st_dev,
            "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _record_check(path: Path, digest: str) -> None:
    """Remember that `path`, as it is now, hashed to `digest` (written whole, then renamed).
    Not for a file changed in the last CHECK_SETTLE_S: a write in the same tick of the file
    system's clock as the hash would leave its times as recorded (git's "racy" files)."""
    identity = _file_identity(path)
    if time.time_ns() - max(identity["ctime_ns"], identity["mtime_ns"]) < CHECK_SETTLE_S * 1e9:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as file:
        json.dump({"sha256": digest, **identity}, file)
    os.chmod(tmp, 0o644)
    os.replace(tmp, _check_path(path))


def _matches(path: Path, expected: str) -> bool:
    """Whether `path`'s bytes have the SHA-256 `expected`: hashed unless a check record
    says this very file (same size, inode, mtime, ctime) was hashed to it before."""
    try:
        checked = json.loads(_check_path(path).read_text())
        if checked == {"sha256": expected, **_file_identity(path)}:
            return True
    except (OSError, ValueError):
        pass
    if file_sha256(path) != expected:
        return False
    with contextlib.suppress(OSError):  # a read-only cache folder: hashed again next time
        _record_check(path, expected)
    return True


def cached_export(model: HTDemucs, export_dir: Path) -> Path:
    """The export of `model` in `export_dir`: made when missing, remade when its bytes do
    not match their recorded SHA-256."""
    path = export_dir / f"htdemucs-{export_key(model)}.onnx"
    recorded = _sum_path(path)
    if path.exists() and recorded.exists() and _matches(path, recorded.read_text().strip()):
        return path
    if path.exists():
        log.warning("the cached export %s does not match its checksum: exporting again", path)
    export(model, path)
    return path


# -- running it ---------------------------------------------------------------------


def onnxruntime_runner(path: Path, threads: int, streams: int = 1) -> Runner:
    """An ONNX Runtime session on `threads` threads, `streams` calls at once sharing them."""
    import onnxruntime as ort  # noqa: PLC0415 - only where this backend runs

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads // streams)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(mix: np.ndarray, mag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        time_out, spec_out = session.run(None, {"mix": mix, "mag": mag})
        return time_out, spec_out

    return run


def openvino_cache_dir(export: Path) -> Path:
    """Where OpenVINO keeps its compiled form of the exports in `export`'s folder."""
    return export.parent / "openvino-cache"


def openvino_settings(threads: int, streams: int = 1) -> dict[str, object]:
    """OpenVINO's compile settings for `threads` threads in `streams` streams."""
    # f32 explicitly: on CPUs with bf16 instructions OpenVINO would otherwise pick bf16.
    return {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
            "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": threads}


def openvino_runner(path: Path, threads: int, streams: int = 1) -> Runner:
    """OpenVINO's compile of the export at `path`, run by `threads` threads in `streams`
    streams: `streams` calls may run at once (from as many Python threads), each on
    threads/streams of them. The compiled form is cached next to the export (OpenVINO's
    model cache, keyed by the file and the compile's settings): a second load reads it
    instead of compiling again."""
    import openvino  # noqa: PLC0415 - only where this backend runs

    core = openvino.Core()
    with contextlib.suppress(OSError):  # a read-only export folder: compiled every time
        openvino_cache_dir(path).mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(openvino_cache_dir(path))})
    compiled = core.compile_model(str(path), "CPU", openvino_settings(threads, streams))
    idle: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(streams):
        idle.put(compiled.create_infer_request())

    def run(mix: np.ndarray, mag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = idle.get()  # one request per call in flight; more wait for one to be free
        try:
            results = request.infer({"mix": mix, "mag": mag})
            # The request reuses its output buffers on the next call.
            return np.array(results[compiled.output(0)]), np.array(results[compiled.output(1)])
        finally:
            idle.put(request)

    return run


RUNNERS: dict[str, Callable[[Path, int, int], Runner]] = {"onnx": onnxruntime_runner, "openvino": openvino_runner}
# The module each runtime needs: imported when a model is prepared, so a runtime that is not
# installed fails at start even where its networks are compiled later (_OnFirstCall).
RUNTIME_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


class _OnFirstCall:
    """A runner made on its first call, once, whichever thread calls first: a bag member
    that no request uses is never compiled (a vocals-only request with htdemucs_ft runs
    only the vocals specialist; compiling the other three costs a command-line run about
    2 s). A model host's warm-up runs every member, so a worker still compiles all at start."""

    def __init__(self, make: Callable[[], Runner]):
        self._make = make
        self._runner: Runner | None = None
        self._lock = threading.Lock()

    @property
    def made(self) -> bool:
        return self._runner is not None

    def __call__(self, mix: np.ndarray, mag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._runner is None:
            with self._lock:  # two streams may call at once
                if self._runner is None:
                    self._runner = self._make()
        return self._runner(mix, mag)


class ExportedHTDemucs(HTDemucs):
    """An HTDemucs whose network runs in another runtime: demucs's own STFT, magnitude,
    mask and iSTFT around it, and no layers of its own."""

    def __init__(self, model: HTDemucs, run: Runner, backend: str, streams: int = 1):
        torch.nn.Module.__init__(self)  # not HTDemucs.__init__: the layers stay out
        for name, value in vars(model).items():
            if not name.startswith("_"):
                object.__setattr__(self, name, value)  # the configuration: sources, segment, nfft, ...
        self._init_args_kwargs = model._init_args_kwargs
        # demucs's apply_model asks a bag's members for their device through a parameter.
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.run = run
        self.backend = backend
        # How many segments the runtime computes at once (from as many threads): the
        # engine hands demucs's apply_model a pool of that many, and a batch of segments
        # (core.separation.batching) is spread over them here.
        self.streams = streams
        self._pool: ThreadPoolExecutor | None = None
        self.eval()

    @property
    def compiled(self) -> bool:
        """Whether the runtime's form of this network has been made (see _OnFirstCall)."""
        return not isinstance(self.run, _OnFirstCall) or self.run.made

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        length = mix.shape[-1]
        segment = _segment_length(self)
        if length > segment:
            raise ValueError(f"{self.backend}: at most one segment ({segment} samples) per call, got {length}")
        # As HTDemucs.forward in inference: a short chunk is padded to the trained length.
        mix = torch.nn.functional.pad(mix.float(), (0, segment - length))
        z = self._spec(mix)
        mag = self._magnitude(z)
        items = [(np.ascontiguousarray(mix[i:i + 1].numpy()), np.ascontiguousarray(mag[i:i + 1].numpy()))
                 for i in range(mix.shape[0])]
        if self.streams > 1 and len(items) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix=f"{self.backend}-stream")
            parts = list(self._pool.map(lambda item: self.run(*item), items))
        else:
            parts = [self.run(*item) for item in items]
        time_branch = torch.from_numpy(np.concatenate([part[0] for part in parts]))
        spec_branch = torch.from_numpy(np.concatenate([part[1] for part in parts]))
        x = self._ispec(self._mask(z, spec_branch), segment)
        return (time_branch + x)[..., :length]


# -- choosing -----------------------------------------------------------------------


def members(model: AnyModel) -> list[torch.nn.Module]:
    return list(model.models) if isinstance(model, BagOfModels) else [model]


def prepare(model: AnyModel, backend: str, export_dir: Path, threads: int | None = None,
            streams: int | None = None) -> tuple[AnyModel, str]:
    """`model` with its networks run by `backend` ("auto": the fastest measured here), and
    the backend it got. PyTorch keeps models this backend cannot run. `streams`: segments
    computed at once (None: `default_streams`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    threads = threads or torch.get_num_threads()
    nets = members(model)
    if backend == "torch":
        return model, "torch"
    if not all(supports(net) for net in nets):
        if backend == "auto":
            return model, "torch"
        raise ModelUnavailableError(f"the {backend} backend runs HTDemucs models only; use --backend torch")
    if backend == "auto":
        backend = choose(nets[0], export_dir, threads)  # type: ignore[arg-type]  # checked by supports()
        if backend == "torch":
            return model, "torch"
    streams = streams or default_streams(backend, threads)
    importlib.import_module(RUNTIME_MODULES[backend])
    make = RUNNERS[backend]
    wrapped = []
    for net in nets:
        path = cached_export(net, export_dir)  # type: ignore[arg-type]  # checked by supports()
        # Exported or checked now, so a job never waits for an export; a bag's members are
        # compiled when first used (_OnFirstCall), a single network now.
        run = _OnFirstCall(functools.partial(make, path, threads, streams)) if len(nets) > 1 \
            else make(path, threads, streams)
        wrapped.append(ExportedHTDemucs(net, run, backend, streams))  # type: ignore[arg-type]
    if isinstance(model, BagOfModels):
        for index, net in enumerate(wrapped):
            model.models[index] = net
        return model, backend
    return wrapped[0], backend


def default_streams(backend: str, threads: int) -> int:
    """Segments computed at once by default: OpenVINO runs two segments on one thread
    each faster than one segment after the other on two threads (docs/performance.md);
    ONNX Runtime, one at a time."""
    return STREAMS_DEFAULT.get(backend, 1) if threads >= 2 else 1


def machine_id(threads: int) -> str:
    """This machine as far as speed goes: its CPU model, core count and our thread count."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}|{os.cpu_count()} cpus|{threads} threads"


def choose(net: HTDemucs, export_dir: Path, threads: int) -> str:
    """The fastest backend for `net` on this machine (remembered in `export_dir`)."""
    choices_path = export_dir / "backend-choices.json"
    key = f"{export_key(net)}|{machine_id(threads)}"
    try:
        choices = json.loads(choices_path.read_text())
    except (OSError, ValueError):
        choices = {}
    if isinstance(choices.get(key), str) and choices[key] in BACKENDS:
        return str(choices[key])
    timings = probe(net, export_dir, threads)
    best = min(timings, key=timings.__getitem__)
    chosen = best if timings[best] < AUTO_MARGIN * timings["torch"] else "torch"
    log.info("backend for this model here: %s (one segment: %s)", chosen,
             ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items()))
    choices[key] = chosen
    export_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=export_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as file:
        json.dump(choices, file, indent=1)
    os.replace(tmp, choices_path)
    return chosen


def probe(net: HTDemucs, export_dir: Path, threads: int) -> dict[str, float]:
    """Median seconds of one segment's forward pass per backend that can run here,
    the backends taking turns."""
    from core.separation.engine import tune_for_cpu  # noqa: PLC0415 - the engine imports this module

    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"torch": tune_for_cpu(net.eval())}
    path = cached_export(net, export_dir)
    for name, runner in RUNNERS.items():
        try:
            runs[name] = ExportedHTDemucs(net, runner(path, threads, 1), name)
        except ImportError:
            log.info("backend %s is not installed", name)
    mix, _ = _example(net, seed=1)
    timings: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(mix)  # the first call pays for lazy set-up
        for _ in range(PROBE_ROUNDS):
            for name, run in runs.items():
                started = time.perf_counter()
                run(mix)
                timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}
