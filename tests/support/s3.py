"""A throwaway S3 server (moto) on 127.0.0.1 for the tests that need object storage.

It runs `moto_server` (the `moto[server]` test dependency) as a subprocess on a free
port and kills it at the end; everything it stores lives in its memory. Moto accepts
any credentials. `STEMBOT_TEST_S3_ENDPOINT` points the tests at an existing server
instead (its credentials from STEMBOT_TEST_S3_ACCESS_KEY / STEMBOT_TEST_S3_SECRET_KEY).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 60.0


def moto_available() -> bool:
    return (importlib.util.find_spec("moto") is not None
            and importlib.util.find_spec("moto.server") is not None
            and importlib.util.find_spec("flask") is not None)


def _command(host: str, port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script), "-H", host, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is up
    except OSError:
        return False


@contextmanager
def temporary_s3():
    """Yield the endpoint URL ("http://127.0.0.1:<port>") of a fresh, empty moto server."""
    root = Path(tempfile.mkdtemp(prefix="stembot-s3-"))
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = root / "moto.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(_command("127.0.0.1", port), stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(endpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto_server did not start on port {port}:\n{output}")
            time.sleep(0.1)
        yield endpoint
    finally:
        process.kill()
        process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
