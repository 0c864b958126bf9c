"""core.storage.s3_client against a real S3 server (moto on loopback): objects, prefixes, and
presigned URLs that work without credentials and are signed for the right host.

Moto checks neither the signature nor the expiry of presigned URLs, nor any condition of
a POST policy, so those are checked here on what the store produces: the signature by an
independent SigV4 computation, the policy by checking its signature and evaluating its
conditions the way S3 does (tests/support/s3_policy.py).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import time
import uuid
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import aiohttp
import pytest

from core.storage import transfer
from core.storage.s3_client import S3Client, S3Config, attachment_disposition
from tests.support.s3_policy import expires_at, s3_accepts, signed_policy

SECRET = "testing"  # the fixture's secret key


def sigv4_query_valid(url: str, secret: str = SECRET, region: str = "us-east-1") -> bool:
    """Whether `url` carries a valid SigV4 query signature (GET, host header only), as S3
    would check it for the host the URL names."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    values = dict(params)
    if values.get("X-Amz-SignedHeaders") != "host":
        return False
    enc = lambda text: quote(text, safe="-_.~")  # noqa: E731
    query = "&".join(f"{k}={v}" for k, v in sorted((enc(k), enc(v)) for k, v in params
                                                     if k != "X-Amz-Signature"))
    canonical = "\n".join(["GET", parts.path, query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"])
    scope = values["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["AWS4-HMAC-SHA256", values["X-Amz-Date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (values["X-Amz-Date"][:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, values.get("X-Amz-Signature", ""))


def fresh_config(s3_server: S3Config, **changes) -> S3Config:
    """The session's server and bucket, under a prefix of this test's own."""
    return dataclasses.replace(s3_server, prefix=f"t-{uuid.uuid4().hex[:8]}/", **changes)


@pytest.fixture
async def store(s3_server):
    async with S3Client(fresh_config(s3_server)) as opened:
        await opened.ensure_bucket()
        yield opened


def write(path, data: bytes):
    path.write_bytes(data)
    return path


# -- keys --------------------------------------------------------------------------------------

def test_key_layout():
    store = S3Client(S3Config(bucket="b", prefix="stembot/"))
    assert store.job_prefix(42) == "stembot/jobs/42/"
    assert store.input_key(42, ".mp3") == "stembot/jobs/42/input.mp3"
    assert store.input_key(42, "") == "stembot/jobs/42/input"
    assert store.stems_prefix(42) == "stembot/jobs/42/stems/"
    with pytest.raises(ValueError):
        store.input_key(42, "/../../x")


def test_prefix_is_made_a_folder():
    assert S3Client(S3Config(bucket="b", prefix="stembot")).job_prefix(1) == "stembot/jobs/1/"
    assert S3Client(S3Config(bucket="b", prefix="")).job_prefix(1) == "jobs/1/"


async def test_not_started_is_an_error():
    with pytest.raises(RuntimeError, match="not started"):
        await S3Client(S3Config(bucket="b")).exists("k")


# -- objects -----------------------------------------------------------------------------------

async def test_ensure_bucket_creates_and_tolerates_existing(s3_server):
    config = dataclasses.replace(s3_server, bucket=f"stembot-new-{uuid.uuid4().hex[:8]}")
    async with S3Client(config) as store:
        assert not await store.exists("stembot/x")  # a missing bucket reads as missing
        await store.ensure_bucket()
        await store.ensure_bucket()
        buckets = await store.client.list_buckets()
        assert config.bucket in [b["Name"] for b in buckets["Buckets"]]


async def test_put_get_round_trip(store, tmp_path):
    data = os.urandom(300_000)
    key = store.input_key(1, ".mp3")
    await store.put_file(key, write(tmp_path / "in.mp3", data), content_type="audio/mpeg")
    head = await store.client.head_object(Bucket=store.bucket, Key=key)
    assert head["ContentType"] == "audio/mpeg" and head["ContentLength"] == len(data)

    out = tmp_path / "out" / "song.mp3"
    out.parent.mkdir()
    assert await store.get_file(key, out) == len(data)
    assert out.read_bytes() == data
    assert os.listdir(out.parent) == ["song.mp3"]  # no partial file left behind


async def test_get_missing_raises_file_not_found(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        await store.get_file(store.input_key(1, ".wav"), tmp_path / "x.wav")
    assert os.listdir(tmp_path) == []


async def test_exists(store, tmp_path):
    key = store.input_key(2, "")
    assert not await store.exists(key)
    await store.put_file(key, write(tmp_path / "f", b"x"))
    assert await store.exists(key)


async def test_list_copy_and_delete_prefix_across_pages(store, tmp_path):
    store.PAGE_SIZE = store.DELETE_BATCH = 2  # several pages and several batches
    source = write(tmp_path / "f", b"stem")
    keys = [store.stems_prefix(5) + f"s{n}.flac" for n in range(5)]
    for key in keys:
        await store.put_file(key, source)
    neighbour = store.input_key(50, ".mp3")  # job 50 shares the text "jobs/5" but not the folder
    await store.put_file(neighbour, source)

    assert await store.list_keys(store.stems_prefix(5)) == sorted(keys)
    await store.copy(keys[0], store.input_key(5, ".flac"))
    assert await store.exists(store.input_key(5, ".flac"))
    assert await store.exists(keys[0])

    assert await store.delete_prefix(store.job_prefix(5)) == 6
    assert await store.list_keys(store.job_prefix(5)) == []
    assert await store.list_keys(store.prefix) == [neighbour]
    assert await store.delete_prefix(store.job_prefix(5)) == 0


async def test_delete_prefix_refuses_outside_its_prefix(store):
    for prefix in ("", "other/", store.prefix.rstrip("/")):
        with pytest.raises(ValueError):
            await store.delete_prefix(prefix)


# -- presigned GET -----------------------------------------------------------------------------

async def test_presigned_get_works_without_credentials(store, tmp_path):
    data = os.urandom(70_000)
    key = store.input_key(3, ".ogg")
    await store.put_file(key, write(tmp_path / "in.ogg", data))
    url = await store.presign_get(key, ttl_s=90.5)

    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["91"]  # rounded up, never shorter than asked
    assert sigv4_query_valid(url)
    assert not sigv4_query_valid(url, secret="wrong")

    dest = tmp_path / "got.ogg"
    assert await transfer.download(url, dest, max_bytes=len(data)) == len(data)
    assert dest.read_bytes() == data


async def test_presigned_get_with_download_name(store, tmp_path):
    key = store.stems_prefix(4) + "vocals.flac"
    await store.put_file(key, write(tmp_path / "v", b"fLaC"))
    url = await store.presign_get(key, ttl_s=60, download_name="Café – vocals.flac")
    assert sigv4_query_valid(url)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
            assert await response.read() == b"fLaC"
            disposition = response.headers["Content-Disposition"]
    assert disposition == ("attachment; filename=\"Caf_ _ vocals.flac\"; "
                           "filename*=UTF-8''Caf%C3%A9%20%E2%80%93%20vocals.flac")


@pytest.mark.parametrize("name, expected", [
    ("drums.mp3", 'attachment; filename="drums.mp3"'),
    ('a"b\\c.wav', "attachment; filename=\"a_b_c.wav\"; filename*=UTF-8''a%22b_c.wav"),
    ("x\r\nSet-Cookie: y.mp3", 'attachment; filename="x__Set-Cookie: y.mp3"'),
    ("tab\there\x7f.wav", 'attachment; filename="tab_here_.wav"'),
    ("../../etc/passwd", "attachment; filename=\".._.._etc_passwd\""),
    ("", 'attachment; filename="download"'),
])
def test_attachment_disposition(name, expected):
    assert attachment_disposition(name) == expected


async def test_presign_ttl_limits(store):
    for ttl in (0, -5, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError):
            await store.presign_get(store.input_key(1, ""), ttl_s=ttl)
        with pytest.raises(ValueError):
            await store.presign_post(store.stems_prefix(1) + "vocals.mp3", ttl_s=ttl, max_bytes=10)


# -- presigned POST ----------------------------------------------------------------------------

async def test_presigned_post_policy_is_for_one_exact_key(store):
    key = store.stems_prefix(6) + "vocals.mp3"
    before = time.time()
    post = await store.presign_post(key, ttl_s=600, max_bytes=12345)
    assert set(post) == {"url", "fields"}
    assert post["fields"]["key"] == key
    assert urlsplit(post["url"]).path == f"/{store.bucket}"

    # What S3 enforces (moto does not): the signed policy's conditions.
    policy = signed_policy(post["fields"])
    conditions = policy["conditions"]
    assert {"key": key} in conditions
    assert ["content-length-range", 1, 12345] in conditions
    assert {"bucket": store.bucket} in conditions
    # nothing else about the key: no prefix, no ${filename}
    assert [c for c in conditions if "$key" in c or "key" in c] == [{"key": key}]
    assert before + 598 <= expires_at(policy) <= time.time() + 601

    bucket = store.bucket
    assert s3_accepts(post, bucket=bucket, key=key, size=12345, now=time.time())
    # another file of the job, a folder's worth of names, the input, the bot's own copies
    for other in (store.stems_prefix(6) + "vocals.mp3x", store.stems_prefix(6) + "drums.mp3",
                  store.stems_prefix(6), store.input_key(6, ".wav"), store.checked_prefix(6) + "vocals.mp3",
                  store.stems_prefix(7) + "vocals.mp3"):
        assert not s3_accepts(post, bucket=bucket, key=other, size=10, now=time.time()), other
    assert not s3_accepts(post, bucket=bucket, key=key, size=12346, now=time.time())
    assert not s3_accepts(post, bucket=bucket, key=key, size=0, now=time.time())
    assert not s3_accepts(post, bucket=bucket, key=key, size=10, now=time.time() + 601)
    assert not s3_accepts(post, bucket=bucket + "x", key=key, size=10, now=time.time())
    # the policy is signed: editing it breaks the signature
    forged = json.loads(base64.b64decode(post["fields"]["policy"]))
    forged["conditions"] = [c for c in forged["conditions"] if c != {"key": key}]
    tampered = {**post, "fields": {**post["fields"], "policy": base64.b64encode(json.dumps(forged).encode()).decode()}}
    assert not s3_accepts(tampered, bucket=bucket, key=store.stems_prefix(6) + "x", size=10, now=time.time())


async def test_presigned_post_refuses_keys_the_uploader_could_choose(store):
    for key in (store.stems_prefix(6), store.stems_prefix(6) + "${filename}", "elsewhere/jobs/6/stems/a.mp3", ""):
        with pytest.raises(ValueError):
            await store.presign_post(key, ttl_s=60, max_bytes=10)
    with pytest.raises(ValueError):
        await store.presign_post(store.stems_prefix(6) + "a.mp3", ttl_s=60, max_bytes=0)


# -- public endpoint ---------------------------------------------------------------------------

async def test_public_endpoint_urls_are_signed_for_the_public_host(s3_server, tmp_path):
    """The bot talks to 127.0.0.1, workers and users to localhost: the same moto server."""
    public = s3_server.endpoint_url.replace("127.0.0.1", "localhost")
    assert public != s3_server.endpoint_url
    async with S3Client(fresh_config(s3_server, public_endpoint_url=public)) as store:
        await store.ensure_bucket()
        key = store.input_key(7, ".wav")
        await store.put_file(key, write(tmp_path / "in.wav", b"RIFF...."))

        url = await store.presign_get(key, ttl_s=60)
        assert url.startswith(public + "/")
        assert sigv4_query_valid(url)
        # the same signature does not hold for the bot's own address
        assert not sigv4_query_valid(url.replace("localhost", "127.0.0.1", 1))
        assert await transfer.download(url, tmp_path / "got.wav", max_bytes=100) == 8

        post = await store.presign_post(store.stems_prefix(7) + "bass.wav", ttl_s=60, max_bytes=100)
        assert post["url"] == f"{public}/{store.bucket}"
        uploaded = await transfer.upload(post, write(tmp_path / "bass.wav", b"bass"))
        assert await store.list_keys(store.stems_prefix(7)) == [uploaded] == [store.stems_prefix(7) + "bass.wav"]


async def test_browser_reads_are_allowed_for_the_players_origin(s3_server):
    """The stem player fetches presigned stems from the page's origin: the bucket's CORS must
    allow that origin's GETs (and keep what the operator had)."""
    config = dataclasses.replace(s3_server, bucket=f"stembot-cors-{uuid.uuid4().hex[:8]}")
    origin = "https://stems.example.org"
    async with S3Client(config) as store:
        await store.ensure_bucket()
        operators = {"AllowedOrigins": ["https://other.example"], "AllowedMethods": ["PUT"]}
        await store.client.put_bucket_cors(Bucket=config.bucket, CORSConfiguration={"CORSRules": [operators]})
        assert await store.allow_browser_reads(origin)
        assert await store.allow_browser_reads(origin)  # once is enough
        rules = (await store.client.get_bucket_cors(Bucket=config.bucket))["CORSRules"]
        assert len(rules) == 2 and rules[0]["AllowedOrigins"] == ["https://other.example"]
        assert rules[1]["AllowedOrigins"] == [origin] and "GET" in rules[1]["AllowedMethods"]
    # (Moto's server answers CORS for every origin whatever the rules say, so the rules
    # stored are what can be checked here.)
