"""core.storage.transfer: moving files with presigned URLs only, against a real S3 server (moto on
loopback), plus a plain aiohttp server for answers moto never gives (no Content-Length)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import socket
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from aiohttp import web

from core.storage.s3_client import S3Client
from core.storage.transfer import TransferError, download, upload


@pytest.fixture
async def store(s3_server):
    config = dataclasses.replace(s3_server, prefix=f"t-{uuid.uuid4().hex[:8]}/")
    async with S3Client(config) as opened:
        await opened.ensure_bucket()
        yield opened


def without_param(url: str, name: str) -> str:
    parts = urlsplit(url)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != name])
    return urlunsplit(parts._replace(query=query))


def assert_no_query_leak(error: TransferError, url: str):
    message = str(error)
    assert "?" not in message and "X-Amz" not in message
    for _, value in parse_qsl(urlsplit(url).query):
        assert value not in message
    # no chained exception either: tracebacks get logged, and aiohttp's messages quote URLs
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


async def test_upload_lands_at_the_policys_key(store, tmp_path):
    data = os.urandom(150_000)
    source = tmp_path / "upload.tmp"
    source.write_bytes(data)
    post = await store.presign_post(store.stems_prefix(1) + "vocals.flac", ttl_s=300, max_bytes=len(data))

    key = await upload(post, source)
    assert key == store.stems_prefix(1) + "vocals.flac"
    assert await store.list_keys(store.job_prefix(1)) == [key]
    assert await store.get_file(key, tmp_path / "back.flac") == len(data)
    assert (tmp_path / "back.flac").read_bytes() == data


async def test_upload_refused_is_a_transfer_error(store, tmp_path):
    source = tmp_path / "f"
    source.write_bytes(b"x")
    post = await store.presign_post(store.stems_prefix(1) + "drums.wav", ttl_s=60, max_bytes=10)
    post["url"] = post["url"].rsplit("/", 1)[0] + "/no-such-bucket-" + uuid.uuid4().hex[:6]
    with pytest.raises(TransferError) as caught:
        await upload(post, source)
    assert caught.value.status == 404
    assert str(caught.value) == "storage has no such object or bucket (HTTP 404 NoSuchBucket)"


async def test_download_refuses_beyond_max_bytes(store, tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "src").write_bytes(data)
    key = store.input_key(2, ".wav")
    await store.put_file(key, tmp_path / "src")
    url = await store.presign_get(key, ttl_s=60)
    dest = tmp_path / "out" / "in.wav"
    dest.parent.mkdir()

    with pytest.raises(TransferError, match="larger than 9999 bytes"):
        await download(url, dest, max_bytes=len(data) - 1)
    assert os.listdir(dest.parent) == []
    assert await download(url, dest, max_bytes=len(data)) == len(data)
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["in.wav"]


async def test_download_counts_bytes_without_content_length(tmp_path):
    """A server that streams without a Content-Length is cut off at max_bytes too."""
    async def stream(request):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"x" * 1000)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/obj", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/obj?X-Amz-Signature=s3cr3t"
        with pytest.raises(TransferError, match="larger than 9999"):
            await download(url, tmp_path / "f", max_bytes=9999)
        assert os.listdir(tmp_path) == []
        assert await download(url, tmp_path / "f", max_bytes=10_000) == 10_000
    finally:
        await runner.cleanup()


async def test_download_refused_403_hides_the_query(store, tmp_path):
    key = store.input_key(3, ".mp3")
    (tmp_path / "src").write_bytes(b"private")
    await store.put_file(key, tmp_path / "src")
    # Moto refuses a private object to a request that carries no signature.
    url = without_param(await store.presign_get(key, ttl_s=60), "X-Amz-Signature")
    assert "X-Amz-Credential=" in url
    with pytest.raises(TransferError) as caught:
        await download(url, tmp_path / "in.mp3", max_bytes=100)
    assert caught.value.status == 403
    assert str(caught.value).startswith("storage link expired or refused (HTTP 403")
    assert_no_query_leak(caught.value, url)
    assert os.listdir(tmp_path) == ["src"]


async def test_download_missing_404_hides_the_query(store, tmp_path):
    url = await store.presign_get(store.input_key(4, ".mp3"), ttl_s=60)
    with pytest.raises(TransferError) as caught:
        await download(url, tmp_path / "in.mp3", max_bytes=100)
    assert caught.value.status == 404
    assert str(caught.value) == "storage has no such object or bucket (HTTP 404 NoSuchKey)"
    assert_no_query_leak(caught.value, url)
    assert os.listdir(tmp_path) == []


async def test_unreachable_store_hides_the_query(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/bucket/key?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA"
    with pytest.raises(TransferError) as caught:
        await download(url, tmp_path / "f", max_bytes=100)
    assert caught.value.status is None
    assert_no_query_leak(caught.value, url)


async def test_download_keeps_stored_bytes_as_they_are(store, tmp_path):
    """No decompression: a gzip-encoded object arrives as the gzip bytes stored."""
    packed = gzip.compress(b"a" * 5000)
    key = store.input_key(5, ".gz")
    await store.client.put_object(Bucket=store.bucket, Key=key, Body=packed, ContentEncoding="gzip")
    url = await store.presign_get(key, ttl_s=60)
    assert await download(url, tmp_path / "f.gz", max_bytes=len(packed)) == len(packed)
    assert (tmp_path / "f.gz").read_bytes() == packed


async def test_environment_proxy_is_ignored(store, tmp_path, monkeypatch):
    (tmp_path / "src").write_bytes(b"direct")
    key = store.input_key(6, "")
    await store.put_file(key, tmp_path / "src")
    url = await store.presign_get(key, ttl_s=60)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard port: nothing answers
    assert await download(url, tmp_path / "f", max_bytes=100) == 6

    post = await store.presign_post(store.stems_prefix(6) + "other.wav", ttl_s=60, max_bytes=100)
    assert await upload(post, tmp_path / "src") == store.stems_prefix(6) + "other.wav"
