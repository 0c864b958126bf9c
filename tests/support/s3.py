"""A throwaway S3 server (moto) on 127.0.0.1 for the tests that need object storage.

It runs `moto_server` (the `moto[server]` test dependency) as a subprocess on a free
port and kills it at the end; everything it stores lives in its memory. Moto accepts
any credentials. `STEMBOT_TEST_S3_ENDPOINT` points the tests at an existing server
instead (its credentials from STEMBOT_TEST_S3_ACCESS_KEY / STEMBOT_TEST_S3_SECRET_KEY).
"""

from __future__ import annotations

import asyncio
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


OUTAGE_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
               b"<Message>injected outage</Message></Error>")
OUTAGE_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(OUTAGE_BODY), OUTAGE_BODY))


class OutageProxy:
    """A loopback TCP proxy in front of an S3 server, to take "S3" down for real while
    the server keeps its objects: `down()` cuts every open connection and answers each new
    request HTTP 503 ServiceUnavailable (as S3 does when it is away), `up()` lets requests
    through again. Point the bot (and so its presigned URLs) at `endpoint`. Use
    `async with OutageProxy(s3_endpoint) as proxy:` inside the test's event loop."""

    def __init__(self, upstream: str) -> None:
        parts = upstream.removeprefix("http://").split(":")
        self.upstream = (parts[0], int(parts[1]))
        self.is_down = False
        self.refused = 0  # requests answered 503
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> OutageProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self._cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def down(self) -> None:
        self.is_down = True
        self._cut()

    def up(self) -> None:
        self.is_down = False

    def _cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve_one(reader, writer)
        except asyncio.CancelledError:
            # The proxy is closing. Ending cancelled would have asyncio's stream callback log
            # the cancellation as an error.
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_down:
            await self._refuse(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._open.discard(writer)
            self._open.discard(up_writer)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            self.refused += 1
            writer.write(OUTAGE_ANSWER)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
