"""Helper processes start with a minimal environment, never the bot's.

ffprobe and ffmpeg read users' files, the model host runs them, and yt-dlp reads pages
of video sites; a crafted file or page that exploits one of them must not find the
Discord token, the storage keys, the database URL or the link secret in its
environment. So every helper gets `helper_env()`: the variables named in an allow-list,
taken from the bot's environment when set, and nothing else. It is an allow-list, not a
list of known secrets, so that a secret under a name nobody listed stays with the bot.

`HelperProcess` is multiprocessing's `spawn` process with such an environment: the
stdlib's spawn passes the parent's whole environment to the child and has no way to
choose it, so its launcher is redone here with `subprocess.Popen(env=...)`, and no
global state (os.environ, the spawn executable) is touched while other threads run.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterable, Mapping
from multiprocessing import popen_spawn_posix, reduction, resource_tracker, spawn, util
from multiprocessing.context import SpawnProcess, set_spawning_popen
from multiprocessing.process import BaseProcess
from typing import Any

# What every helper may see: where programs and libraries are, the locale and time zone,
# temporary files and the home folder (caches default to it), the model caches, and what
# PyTorch, CUDA/ROCm and the maths libraries read (devices, threads, memory).
PASSED_NAMES = frozenset({
    "PATH", "LD_LIBRARY_PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
    # Model caches (demucs through torch.hub and huggingface_hub; STEMBOT_MODEL_DIR goes in HostConfig).
    "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    # Where numba keeps the functions it compiled for librosa (the tempo and key analysis in
    # the model host): they load in a second instead of compiling for up to 30.
    "NUMBA_CACHE_DIR",
    # Devices.
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_MODULE_LOADING", "CUDA_LAUNCH_BLOCKING", "CUDA_HOME",
    "CUDA_PATH", "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
    "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HSA_OVERRIDE_GFX_VERSION",
    "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_NO_CUDA_MEMORY_CACHING",
    "PYTORCH_ENABLE_MPS_FALLBACK",
    # Threads of the maths libraries (the OpenMP, MKL and OpenBLAS families are below).
    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    # How the Python of the model host and of yt-dlp's process runs (never where it imports from).
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONFAULTHANDLER", "PYTHONIOENCODING", "PYTHONUTF8",
})
# Whole families owned by one runtime: the locale categories and the OpenMP, MKL and
# OpenBLAS settings (OMP_NUM_THREADS, KMP_AFFINITY, MKL_NUM_THREADS, OPENBLAS_CORETYPE, ...).
PASSED_PREFIXES = ("LC_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_")
# For helpers that make HTTPS requests: which certificates to trust.
CA_NAMES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
# For the model host, which may download a model: the proxy, if the operator set one.
PROXY_NAMES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
               "ALL_PROXY", "all_proxy")


def helper_env(extra: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a helper process: the allowed variables of `environ` (default:
    this process's environment, read now), plus those named in `extra`."""
    source = os.environ if environ is None else environ
    allowed = PASSED_NAMES.union(extra)
    return {name: value for name, value in source.items() if name in allowed or name.startswith(PASSED_PREFIXES)}


class _MinimalEnvPopen(popen_spawn_posix.Popen):
    """multiprocessing's spawn launcher (CPython's popen_spawn_posix.Popen._launch), with
    the child started by `subprocess.Popen` in the given environment instead of
    `util.spawnv_passfds`, which always passes this process's."""

    _fds: list[int]  # set by the base class: what the child inherits

    def __init__(self, process_obj: HelperProcess):
        self._env = process_obj.env
        self._child: subprocess.Popen[bytes] | None = None
        super().__init__(process_obj)

    def _launch(self, process_obj: Any) -> None:
        tracker_fd = resource_tracker.getfd()
        assert tracker_fd is not None  # getfd starts the tracker first
        self._fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj._name)
        fp = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            set_spawning_popen(None)

        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            self._fds.extend([child_r, child_w])
            self._child = subprocess.Popen(cmd, executable=spawn.get_executable(), env=self._env,
                                           pass_fds=sorted(set(self._fds)), restore_signals=False)
            self.pid = self._child.pid
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(fp.getbuffer())
        finally:
            self.finalizer = util.Finalize(self, _close_fds, [fd for fd in (parent_r, parent_w) if fd is not None])
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        # Reaped through the subprocess object that started it, so that it knows the
        # child is gone (else it would wait for it again, and warn, when collected).
        if self.returncode is None and self._child is not None:
            self.returncode = self._child.poll() if flag & os.WNOHANG else self._child.wait()
        return self.returncode


class HelperProcess(SpawnProcess):
    """A `spawn` process (use it with the spawn context's queues and locks) whose
    environment is `env` (default: `helper_env()` when it starts)."""

    def __init__(self, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._env = None if env is None else dict(env)

    @property
    def env(self) -> dict[str, str]:
        return helper_env() if self._env is None else self._env

    @staticmethod
    def _Popen(process_obj: BaseProcess) -> _MinimalEnvPopen:
        assert isinstance(process_obj, HelperProcess)
        return _MinimalEnvPopen(process_obj)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
