"""core.helper_env: the allow-list, and a spawned HelperProcess's real environment."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

from core.helper_env import CA_NAMES, PROXY_NAMES, HelperProcess, helper_env
from tests.support.secrets_env import SECRETS, leaked, parse_environ, put_secrets

NEEDED = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/stembot", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
    "TMPDIR": "/var/tmp/stembot", "TORCH_HOME": "/models/torch", "HF_HOME": "/models/hf", "XDG_CACHE_HOME": "/cache",
    "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}
NETWORK = {"HTTPS_PROXY": "http://proxy.internal:3128", "SSL_CERT_FILE": "/etc/ssl/certs/ca.pem"}


def test_only_the_allowed_names_pass():
    environ = {**NEEDED, **NETWORK, **SECRETS, "HF_TOKEN": "hf_x", "PYTHONPATH": "/evil", "LD_PRELOAD": "/evil.so",
               "STEMBOT_MODEL": "htdemucs", "DATABASE_URL": "postgresql://u:p@h/d"}
    assert helper_env(environ=environ) == NEEDED
    assert helper_env(CA_NAMES, environ=environ) == {**NEEDED, "SSL_CERT_FILE": NETWORK["SSL_CERT_FILE"]}
    assert helper_env((*PROXY_NAMES, *CA_NAMES), environ=environ) == {**NEEDED, **NETWORK}


def test_it_reads_the_environment_when_called(monkeypatch):
    monkeypatch.setenv("TMPDIR", "/somewhere/else")
    put_secrets(monkeypatch)
    env = helper_env()
    assert env["TMPDIR"] == "/somewhere/else" and env["PATH"] == os.environ["PATH"]
    assert not set(env) & set(SECRETS)


def _wait_then_exit(started, release, code: int) -> None:
    started.set()
    release.wait(30)
    sys.exit(code)


def test_a_helper_process_starts_without_the_secrets_and_is_supervised_as_usual(monkeypatch):
    put_secrets(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    ctx = multiprocessing.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    child = HelperProcess(target=_wait_then_exit, args=(started, release, 3), daemon=True)
    child.start()
    try:
        assert started.wait(60)  # it runs, and the spawn context's objects reach it
        raw = Path(f"/proc/{child.pid}/environ").read_bytes()
        assert leaked(raw) == []
        assert parse_environ(raw) == helper_env()
        assert parse_environ(raw)["OMP_NUM_THREADS"] == "3"
        assert child.is_alive()
        release.set()
        child.join(30)
        assert child.exitcode == 3
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_a_killed_helper_process_reports_its_signal():
    ctx = multiprocessing.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    child = HelperProcess(target=_wait_then_exit, args=(started, release, 0), daemon=True, env={"PATH": "/usr/bin"})
    child.start()
    assert started.wait(60)
    assert parse_environ(Path(f"/proc/{child.pid}/environ").read_bytes()) == {"PATH": "/usr/bin"}
    child.kill()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL and not child.is_alive()
