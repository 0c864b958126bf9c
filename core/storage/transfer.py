"""Moving files to and from object storage with presigned URLs (worker side).

Workers hold no storage credentials: the bot hands them a presigned GET for a job's
input and a presigned POST for each file it may store (see `core.storage.s3_client`). The URLs are bearer
tokens, so no message, log line or exception raised here contains one: errors carry the
HTTP status and S3's error code only.

Plain aiohttp, without the environment's proxy settings (`trust_env=False`) and without
decompression, so the bytes written are the bytes stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from pathlib import Path

import aiohttp

log = logging.getLogger(__name__)

CHUNK = 1 << 16
CONNECT_TIMEOUT_S = 30.0
# How much of an error answer is read to find S3's <Code>.
ERROR_BODY_BYTES = 4096
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")


class TransferError(Exception):
    """A transfer failed. The message is short and never contains the URL's query.
    `transient`: the store was away or overloaded (a 5xx, a timeout, a connection refused
    or reset), so the same transfer may work later."""

    def __init__(self, reason: str, status: int | None = None, transient: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.transient = transient


def is_transient(exc: BaseException) -> bool:
    """Whether a failed transfer is worth trying again (for core.outages.retry_transient)."""
    return isinstance(exc, TransferError) and exc.transient


def _session(timeout_s: float) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, timeout_s))
    return aiohttp.ClientSession(timeout=timeout, trust_env=False, auto_decompress=False)


async def _status_error(response: aiohttp.ClientResponse, action: str) -> TransferError:
    status = response.status
    code = ""
    try:
        match = _ERROR_CODE.search(await response.content.read(ERROR_BODY_BYTES))
        code = f" {match.group(1).decode('ascii')}" if match else ""
    except (TimeoutError, aiohttp.ClientError):
        pass
    if status == 403:
        return TransferError(f"storage link expired or refused (HTTP 403{code})", status)
    if status == 404:
        return TransferError(f"storage has no such object or bucket (HTTP 404{code})", status)
    return TransferError(f"storage refused the {action} (HTTP {status}{code})", status,
                         transient=status >= 500 or status == 429)


def _network_error(exc: BaseException, action: str) -> TransferError:
    # Only the class name: aiohttp's messages can quote the whole URL, query included.
    if isinstance(exc, asyncio.TimeoutError):
        return TransferError(f"storage {action} timed out", transient=True)
    return TransferError(f"storage {action} failed ({type(exc).__name__})",
                         transient=isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError))


async def download(url: str, dest: Path, max_bytes: int, timeout_s: float = 600) -> int:
    """Fetch a presigned GET `url` into `dest`; returns the bytes written. Anything over
    `max_bytes` is refused, and `dest` only ever appears complete."""
    dest = Path(dest)
    partial = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    try:
        async with _session(timeout_s) as session:
            # No redirects: a presigned URL answers itself, and a hop could leak the query.
            async with session.get(url, allow_redirects=False,
                                   headers={"Accept-Encoding": "identity"}) as response:
                if not 200 <= response.status < 300:
                    raise await _status_error(response, "download")
                if response.content_length is not None and response.content_length > max_bytes:
                    raise TransferError(f"stored file is larger than {max_bytes} bytes")
                size = 0
                with open(partial, "wb") as out:  # noqa: ASYNC230 - a local file, read or written chunk by chunk as the network goes
                    async for chunk in response.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        # Counted as it streams: a missing or lying Content-Length changes nothing.
                        if size > max_bytes:
                            raise TransferError(f"stored file is larger than {max_bytes} bytes")
                        out.write(chunk)
        os.replace(partial, dest)
        return size
    except (TimeoutError, aiohttp.ClientError) as exc:
        # `from None`: the cause's text may hold the URL, and tracebacks get logged.
        raise _network_error(exc, "download") from None
    finally:
        partial.unlink(missing_ok=True)


async def upload(post: dict, path: Path, timeout_s: float = 600) -> str:
    """Upload `path` with a presigned POST (`S3Client.presign_post`) to the one key it
    names; returns that key."""
    key = post["fields"]["key"]
    path = Path(path)
    try:
        async with _session(timeout_s) as session:
            with open(path, "rb") as body:  # noqa: ASYNC230 - a local file, read or written chunk by chunk as the network goes
                form = aiohttp.FormData()
                for field, value in post["fields"].items():
                    form.add_field(field, value)
                # S3 ignores every field after the file, so it goes last.
                form.add_field("file", body, filename=path.name, content_type="application/octet-stream")
                async with session.post(post["url"], data=form, allow_redirects=False) as response:
                    if not 200 <= response.status < 300:
                        raise await _status_error(response, "upload")
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _network_error(exc, "upload") from None
    log.debug("uploaded %s", key)
    return key
