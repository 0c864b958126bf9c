"""Downloading a user's file to local disk, with a byte cap and a time cap.

Used for Discord attachments. The bytes are written to a temporary name and moved into
place only when complete, so a failed download leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from .errors import InputError, TooLargeError


class FetchError(InputError):
    kind = "unreachable"


CHUNK = 1 << 16


async def download(url: str, dest: Path, max_bytes: int, timeout_s: float = 120.0,
                   session: aiohttp.ClientSession | None = None) -> int:
    """Download `url` to `dest`; returns the number of bytes. Raises TooLargeError past
    `max_bytes` and FetchError when the file cannot be fetched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    own = session is None
    if own:
        # trust_env=False: never route user downloads through a proxy from the environment.
        session = aiohttp.ClientSession(trust_env=False, auto_decompress=False)
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise FetchError(f"the file could not be downloaded (HTTP {response.status})")
                declared = response.content_length
                if declared is not None and declared > max_bytes:
                    raise TooLargeError(f"the file is {declared / 1e6:.0f} MB, over the {max_bytes / 1e6:.0f} MB limit")
                size = 0
                with open(partial, "wb") as out:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            raise TooLargeError(f"the file is over the {max_bytes / 1e6:.0f} MB limit")
                        out.write(chunk)
        os.replace(partial, dest)
        return size
    except TimeoutError:
        raise FetchError("the download took too long") from None
    except aiohttp.ClientError as exc:
        raise FetchError(f"the file could not be downloaded ({exc.__class__.__name__})") from None
    finally:
        partial.unlink(missing_ok=True)
        if own:
            await session.close()
