"""S3-compatible object storage for distributed mode (bot side, holds the credentials).

The bot puts a job's input under `<prefix>jobs/<job_id>/`, then hands the worker presigned
URLs instead of credentials: a GET for the input, and one POST per file it may write, each
for that exact key under the job's `stems/` and up to a size. What the bot delivers comes
from its own copies under `checked/`, which no POST ever covers; users get presigned GET
links to those. A presigned URL is a bearer token: never log one (log keys, or
`core.storage.signed_links.redact(url)`).

Works with AWS S3 and with S3-compatible stores (MinIO, SeaweedFS, Garage, R2). When
workers and users reach the store at another address than the bot (docker compose: the
bot uses http://s3:8333, users https://s3.example.org), `public_endpoint_url` is the
address the presigned URLs carry; they are signed for that host, since the host is part
of what SigV4 signs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from core.outages import DEFAULT_BUDGET_S, Outage, network_error, retry_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

CHUNK = 1 << 16
# SigV4 presigned URLs and POST policies are valid for at most 7 days.
MAX_PRESIGN_TTL_S = 7 * 24 * 3600
_MISSING_CODES = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")
# What S3 answers when it is overloaded or briefly away, whatever the HTTP status says.
_TRANSIENT_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout")


@dataclass(frozen=True)
class S3Config:
    """Where the objects live. `endpoint_url` None means AWS itself; `public_endpoint_url`
    is the address presigned URLs carry when others reach the store elsewhere than the bot;
    keys None means botocore's usual credential chain (AWS_ACCESS_KEY_ID, ...)."""

    bucket: str
    endpoint_url: str | None = None
    public_endpoint_url: str | None = None
    region: str = "us-east-1"
    prefix: str = "stembot/"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    # How long a call keeps trying through transient errors (5xx, timeouts, connections
    # refused or reset) before it gives up with core.outages.DependencyDown.
    transient_retry_s: float = DEFAULT_BUDGET_S


class S3ClientError(Exception):
    """The store refused part of a request it answered (e.g. some keys of a batch delete)."""


def attachment_disposition(name: str) -> str:
    """A Content-Disposition value that makes browsers save the file as `name` (RFC 6266):
    a plain-ASCII `filename` fallback, plus `filename*` when `name` is not plain ASCII."""
    # No folders, and no control characters (a CR LF would end the header).
    name = "".join("_" if c in "/\\" or c < " " or c == "\x7f" else c for c in name).strip()
    name = name or "download"
    # Quotes and backslashes would end the quoted string; non-ASCII goes to filename*.
    fallback = "".join(c if c < "\x7f" and c not in '"\\' else "_" for c in name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += "; filename*=UTF-8''" + quote(name, safe="!#$&+-.^_`|~")
    return value


def _presign_ttl(ttl_s: float) -> int:
    ttl = int(-(-ttl_s // 1))  # round up: a link is never shorter than asked
    if not 1 <= ttl <= MAX_PRESIGN_TTL_S:
        raise ValueError(f"presigned TTL must be 1 s to 7 days, not {ttl_s!r}")
    return ttl


def _is_missing(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or str(error.get("Code")) in _MISSING_CODES


def is_transient(exc: BaseException) -> bool:
    """Whether an error of a call to the store may go away if the call is made again: a
    5xx or a throttle, a timeout, a connection refused, reset or closed. A 4xx is not."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(exc.response.get("Error", {}).get("Code"))
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True  # refused, reset, closed, timed out, or the body cut off
    if isinstance(exc, BotoCoreError):
        return False  # a bad parameter, missing credentials: trying again changes nothing
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError) or network_error(exc)


def _md5_b64(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


class S3Client:
    """One bucket, every key under `config.prefix`. Use `async with S3Client(cfg) as store:`
    or `start()` / `close()`."""

    # Page and batch sizes; S3 allows at most 1000 (tests lower them to cross pages).
    PAGE_SIZE = 1000
    DELETE_BATCH = 1000

    def __init__(self, config: S3Config):
        prefix = config.prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            # "stembot" would put jobs under "stembotjobs/..."; a folder is what is meant.
            prefix += "/"
        self.config = config
        self.bucket = config.bucket
        self.prefix = prefix
        self._stack: contextlib.AsyncExitStack | None = None
        # aiobotocore's clients are untyped.
        self._client: Any = None
        self._presigner: Any = None
        # Down while a call is retried through an outage: the dispatcher starts no new job
        # meanwhile, and /readyz says "storage" false.
        self.outage = Outage("the object store")

    async def start(self) -> None:
        """Open the clients (no network yet)."""
        if self._stack is not None:
            return
        session = get_session()
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.create_client("s3", **self._client_args(self.config.endpoint_url)))
            public = self.config.public_endpoint_url
            if public and public != self.config.endpoint_url:
                # SigV4 signs the Host header: a URL signed for the bot's address and then
                # rewritten to the public one would be refused, so sign with a client of its own.
                self._presigner = await stack.enter_async_context(
                    session.create_client("s3", **self._client_args(public)))
            else:
                self._presigner = self._client
        except BaseException:
            await stack.aclose()
            self._client = self._presigner = None
            raise
        self._stack = stack

    async def close(self) -> None:
        """Close the clients; the store can be started again."""
        stack, self._stack = self._stack, None
        self._client = self._presigner = None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> S3Client:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _client_args(self, endpoint_url: str | None) -> dict:
        config = AioConfig(
            signature_version="s3v4",
            # Custom endpoints (MinIO, SeaweedFS, compose service names) rarely serve
            # bucket subdomains; AWS itself prefers them.
            s3={"addressing_style": "path" if endpoint_url else "auto",
                # Otherwise botocore SHA-256s the whole body on the event loop over plain http;
                # put_file sends Content-MD5 instead, computed in a thread.
                "payload_signing_enabled": False},
            # botocore >= 1.36 adds CRC32 trailers and aws-chunked bodies by default, which
            # several S3-compatible stores reject; send checksums only where S3 demands them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # One try per call: S3Client._call tries again (core.outages: backoff with jitter
            # within STEMBOT_TRANSIENT_RETRY_S), noting the store down as soon as a call fails.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        return {
            "region_name": self.config.region,
            "endpoint_url": endpoint_url,
            "aws_access_key_id": self.config.access_key_id,
            "aws_secret_access_key": self.config.secret_access_key,
            "config": config,
        }

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """`await call()`, tried again through transient errors for `transient_retry_s`."""
        return await retry_transient(call, transient=is_transient, budget_s=self.config.transient_retry_s,
                                     outage=self.outage)

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Client is not started")
        return self._client

    # Keys

    def job_prefix(self, job_id: int) -> str:
        return f"{self.prefix}jobs/{int(job_id)}/"

    def input_key(self, job_id: int, suffix: str) -> str:
        """The key of a job's input; `suffix` is its extension (".mp3"), possibly ""."""
        if "/" in suffix or "\\" in suffix:
            raise ValueError(f"bad input suffix {suffix!r}")
        return f"{self.job_prefix(job_id)}input{suffix}"

    def stems_prefix(self, job_id: int) -> str:
        """Where a job's worker uploads its stems (through POST policies for exact keys)."""
        return f"{self.job_prefix(job_id)}stems/"

    def checked_prefix(self, job_id: int) -> str:
        """Where the bot keeps its own copies of a job's stems, made from the bytes it
        checked: no upload policy ever names a key here, so only the bot can write them."""
        return f"{self.job_prefix(job_id)}checked/"

    # Objects

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing (compose, tests); an existing one is fine."""
        try:
            await self._call(lambda: self.client.head_bucket(Bucket=self.bucket))
            return
        except ClientError as exc:
            if not _is_missing(exc):
                raise
        args: dict = {"Bucket": self.bucket}
        if self.config.region != "us-east-1":
            # us-east-1 is the default and refuses an explicit constraint.
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        try:
            await self._call(lambda: self.client.create_bucket(**args))
            log.info("created bucket %s", self.bucket)
        except ClientError as exc:
            # Another process may have created it between the two calls.
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                                  "BucketAlreadyExists"):
                raise

    async def allow_browser_reads(self, origin: str) -> bool:
        """Let pages of `origin` (the bot's public web server: the stem player) fetch objects
        with presigned GETs (CORS). The bucket's other CORS rules are kept; nothing changes
        when one already allows GET from `origin` or from anywhere. False, with a warning,
        when the bucket's CORS cannot be read or written (the operator then adds the rule)."""
        try:
            try:
                answer = await self._call(lambda: self.client.get_bucket_cors(Bucket=self.bucket))
                rules = list(answer.get("CORSRules", []))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchCORSConfiguration":
                    raise
                rules = []
            if any("GET" in rule.get("AllowedMethods", []) and
                   ({origin, "*"} & set(rule.get("AllowedOrigins", []))) for rule in rules):
                return True
            rules.append({"ID": "stembot-player", "AllowedOrigins": [origin], "AllowedMethods": ["GET", "HEAD"],
                          "AllowedHeaders": ["*"], "MaxAgeSeconds": 3600})
            await self._call(lambda: self.client.put_bucket_cors(Bucket=self.bucket,
                                                                 CORSConfiguration={"CORSRules": rules}))
            log.info("bucket %s: CORS now allows GET from %s (the stem player)", self.bucket, origin)
            return True
        except ClientError as exc:
            log.warning("bucket %s: could not allow GET from %s by CORS (%s); the stem player cannot load "
                        "stems until the bucket allows it (see README, 'The stem player')", self.bucket, origin,
                        exc.response.get("Error", {}).get("Code"))
            return False

    async def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        """Upload a file in one PUT (S3 takes up to 5 GB that way)."""
        path = Path(path)
        md5 = await asyncio.to_thread(_md5_b64, path)
        args: dict = {"Bucket": self.bucket, "Key": key, "ContentMD5": md5}
        if content_type:
            args["ContentType"] = content_type
        await self._call(lambda: self._put_once(path, args))
        log.debug("stored %s (%d bytes)", key, path.stat().st_size)

    async def _put_once(self, path: Path, args: dict) -> None:
        with open(path, "rb") as body:  # noqa: ASYNC230 - a local file, read or written chunk by chunk as the network goes
            # The file object is streamed (aiohttp reads it in a thread); the store checks
            # Content-MD5, so a body damaged on the way is refused, not kept.
            await self.client.put_object(Body=body, **args)

    async def get_file(self, key: str, dest: Path) -> int:
        """Download `key` to `dest`; returns the bytes written. FileNotFoundError if missing."""
        return await self._call(lambda: self._get_once(key, Path(dest)))

    async def _get_once(self, key: str, dest: Path) -> int:
        partial = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            try:
                response = await self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(f"no object {key!r} in bucket {self.bucket!r}") from None
                raise
            size = 0
            async with response["Body"] as stream:
                with open(partial, "wb") as out:  # noqa: ASYNC230 - a local file, read or written chunk by chunk as the network goes
                    while chunk := await stream.read(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
            # Renamed only once complete, so `dest` is never half a file.
            os.replace(partial, dest)
            return size
        finally:
            partial.unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        try:
            await self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    async def list_keys(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`, in S3's (lexicographic) order."""
        return await self._call(lambda: self._list_once(prefix))

    async def _list_once(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix,
                                   PaginationConfig={"PageSize": self.PAGE_SIZE})
        async for page in pages:
            keys.extend(item["Key"] for item in page.get("Contents", ()))
        return keys

    async def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy within the bucket (up to 5 GB)."""
        await self._call(lambda: self.client.copy_object(Bucket=self.bucket, Key=dst_key,
                                                          CopySource={"Bucket": self.bucket, "Key": src_key}))

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many. The prefix must lie inside this
        store's prefix and not be empty, so a slip cannot empty the bucket."""
        if not prefix or not prefix.startswith(self.prefix):
            raise ValueError(f"refusing to delete outside {self.prefix!r}: {prefix!r}")
        keys = await self.list_keys(prefix)
        deleted = 0
        for start in range(0, len(keys), self.DELETE_BATCH):
            batch = keys[start:start + self.DELETE_BATCH]
            delete = {"Objects": [{"Key": key} for key in batch], "Quiet": True}
            response = await self._call(functools.partial(self.client.delete_objects, Bucket=self.bucket,
                                                          Delete=delete))
            errors = response.get("Errors") or []
            deleted += len(batch) - len(errors)
            if errors:
                first = errors[0]
                raise S3ClientError(f"{len(errors)} of {len(batch)} deletes refused under {prefix!r}, "
                                       f"e.g. {first.get('Key')!r}: {first.get('Code')}")
        if deleted:
            log.debug("deleted %d objects under %s", deleted, prefix)
        return deleted

    # Presigned access, for holders of no credentials

    async def presign_get(self, key: str, ttl_s: float, download_name: str | None = None) -> str:
        """A URL that fetches `key` for `ttl_s` seconds. With `download_name`, the answer
        asks browsers to save it under that name."""
        params = {"Bucket": self.bucket, "Key": key}
        if download_name:
            params["ResponseContentDisposition"] = attachment_disposition(download_name)
        if self._presigner is None:
            raise RuntimeError("S3Client is not started")
        return await self._presigner.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=_presign_ttl(ttl_s))

    async def presign_post(self, key: str, ttl_s: float, max_bytes: int) -> dict:
        """A form upload of exactly `key`, of 1 to `max_bytes` bytes, allowed for `ttl_s`
        seconds: {"url", "fields"}, the key among the fields. The uploader sends the fields,
        then the file (see `core.storage.transfer.upload`); S3 refuses any other key or size."""
        # A key ending in a folder or "${filename}" would let the uploader choose the name.
        if not key.startswith(self.prefix) or key.endswith("/") or "${" in key:
            raise ValueError(f"an upload needs one exact key under {self.prefix!r}: {key!r}")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._presigner is None:
            raise RuntimeError("S3Client is not started")
        # botocore adds {"bucket": ...} and {"key": key}: an exact match, not a prefix.
        post = await self._presigner.generate_presigned_post(
            Bucket=self.bucket, Key=key, Conditions=[["content-length-range", 1, int(max_bytes)]],
            ExpiresIn=_presign_ttl(ttl_s))
        return {"url": post["url"], "fields": dict(post["fields"])}
