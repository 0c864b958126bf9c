"""core.ops.web on real sockets: signed downloads on the public listener, health and metrics on
the operators' one, and neither serving what belongs to the other."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import quote, unquote

import aiohttp
import pytest
from yarl import URL

from core.ops.web import HealthChecks, Metrics, build_ops_app, build_public_app, start_web, stop_web
from core.storage.signed_links import LinkSigner

SECRET = b"s" * 32
STEM_BYTES = bytes(range(256)) * 400 + b"end"


@pytest.fixture
def storage(tmp_path):
    root = tmp_path / "storage"
    stems = root / "17" / "stems"
    stems.mkdir(parents=True)
    (stems / "vocals.mp3").write_bytes(STEM_BYTES)
    (stems / "bass ä.flac").write_bytes(b"flac bytes")
    outside = tmp_path / "secret.txt"
    outside.write_text("outside storage")
    (stems / "escape.mp3").symlink_to(outside)
    (root / "18").symlink_to(tmp_path, target_is_directory=True)  # a job folder leading out
    (tmp_path / "stems").mkdir()
    (tmp_path / "stems" / "x.mp3").write_text("outside storage too")
    return root


def _base_url(runner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


@pytest.fixture
async def server(storage):
    """(session, public base URL, signer, health, metrics, operators' base URL), as the bot
    starts them: two listeners."""
    health = HealthChecks()
    metrics = Metrics()
    public = await start_web(build_public_app(storage_root=storage, signer=LinkSigner(SECRET, "http://unused")),
                             "127.0.0.1", 0)
    ops = await start_web(build_ops_app(health=health, metrics=metrics), "127.0.0.1", 0)
    base = _base_url(public)
    signer = LinkSigner(SECRET, base)
    async with aiohttp.ClientSession() as session:
        yield session, base, signer, health, metrics, _base_url(ops)
    await stop_web(public)
    await stop_web(ops)


async def test_livez(server):
    session, *_, ops = server
    async with session.get(f"{ops}/livez") as response:
        assert response.status == 200
        assert await response.text() == "ok"


async def test_operator_endpoints_are_not_on_the_public_listener(server):
    session, base, signer, health, metrics, ops = server

    async def yes():
        return True

    health.register("database", yes)
    metrics.job_finished("done")
    for path in ("/livez", "/readyz", "/metrics", "/metrics/", "/METRICS", "/readyz?x=1"):
        async with session.get(f"{base}{path}") as response:
            assert response.status == 404, path
            body = await response.text()
        assert "stembot_" not in body and "database" not in body, path
        async with session.head(f"{base}{path}") as response:
            assert response.status == 404, path
    # ... and the operators' listener serves them, but no downloads, even with a good signature.
    for path in ("/livez", "/readyz", "/metrics"):
        async with session.get(f"{ops}{path}") as response:
            assert response.status == 200, path
    good = signer.sign("17/vocals.mp3", time.time() + 600)
    async with session.get(ops + good.removeprefix(base)) as response:
        assert response.status == 404
        assert await response.read() != STEM_BYTES


async def test_readyz_passes_then_fails_on_false_raise_or_hang(server):
    session, *_, health, _, base = server

    async def yes():
        return True

    async def no():
        return False

    async def boom():
        raise RuntimeError("database is down")

    async def hang():
        await asyncio.sleep(30)
        return True

    health.register("gateway", yes)
    health.register("database", yes)
    async with session.get(f"{base}/readyz") as response:
        assert response.status == 200
        assert await response.json() == {"ready": True, "checks": {"gateway": True, "database": True}}

    for name, check in (("worker", no), ("worker", boom), ("worker", hang)):
        health.register(name, check)
        started = time.monotonic()
        async with session.get(f"{base}/readyz") as response:
            assert response.status == 503, check.__name__
            body = await response.json()
        assert body == {"ready": False, "checks": {"gateway": True, "database": True, "worker": False}}
        assert time.monotonic() - started < 5  # a hanging check is cut off after 1 s

    health.unregister("worker")
    async with session.get(f"{base}/readyz") as response:
        assert response.status == 200


async def test_metrics_after_jobs(server):
    session, *_, metrics, base = server
    metrics.job_finished("done", separation_s=42.0, audio_s=180.0)
    metrics.job_finished("done", separation_s=30.0, audio_s=120.0)
    metrics.job_finished("failed", kind="corrupt")
    metrics.set_states({"queued": 3, "running": 1})
    metrics.set_states({"running": 2})
    metrics.set_queue_length(3)
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    lines = set(text.splitlines())
    assert 'stembot_jobs_total{state="done"} 2.0' in lines
    assert 'stembot_jobs_total{state="failed"} 1.0' in lines
    assert 'stembot_jobs_total{state="cancelled"} 0.0' in lines
    assert 'stembot_failures_total{kind="corrupt"} 1.0' in lines
    assert 'stembot_jobs_in_state{state="queued"} 0.0' in lines
    assert 'stembot_jobs_in_state{state="running"} 2.0' in lines
    assert "stembot_queue_length 3.0" in lines
    assert "stembot_separation_seconds_count 2.0" in lines
    assert "stembot_separation_seconds_sum 72.0" in lines
    assert 'stembot_separation_seconds_bucket{le="30.0"} 1.0' in lines
    assert "stembot_audio_minutes_total 5.0" in lines
    # A registry of its own: nothing from the process-wide default registry.
    assert "python_info" not in text and "process_cpu_seconds_total" not in text


async def test_signed_link_downloads_the_exact_bytes(server, caplog):
    session, base, signer, *_ = server
    url = signer.sign("17/vocals.mp3", time.time() + 600)
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        async with session.get(url) as response:
            assert response.status == 200
            assert await response.read() == STEM_BYTES
            assert response.headers["Content-Disposition"].startswith('attachment; filename="vocals.mp3"')
            assert "no-store" in response.headers["Cache-Control"]
        # The server writes its access line once the response is out, maybe after our read.
        for _ in range(100):
            if caplog.records:
                break
            await asyncio.sleep(0.01)
    # The access log names the file but never the signature.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/dl/17/vocals.mp3" in logged and "sig=" not in logged


async def test_non_ascii_name(server):
    session, base, signer, *_ = server
    async with session.get(signer.sign("17/bass ä.flac", time.time() + 600)) as response:
        assert response.status == 200
        assert await response.read() == b"flac bytes"
        disposition = response.headers["Content-Disposition"]
    assert 'filename="bass _.flac"' in disposition
    assert unquote(disposition.split("filename*=UTF-8''")[1]) == "bass ä.flac"


async def test_expired_link_is_gone(server):
    session, base, signer, *_ = server
    async with session.get(signer.sign("17/vocals.mp3", time.time() - 1)) as response:
        assert response.status == 410
        assert await response.text() == "link expired"


@pytest.mark.parametrize("tamper", ["sig", "exp", "path", "no_query"])
async def test_tampered_link_is_forbidden(server, tamper):
    session, base, signer, *_ = server
    url = signer.sign("17/vocals.mp3", time.time() + 600)
    if tamper == "sig":
        url = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    elif tamper == "exp":
        exp = url.split("exp=")[1].split("&")[0]
        url = url.replace(f"exp={exp}", f"exp={int(exp) + 3600}")
    elif tamper == "path":
        url = url.replace("/dl/17/", "/dl/16/")
    else:
        url = url.split("?")[0]
    async with session.get(url) as response:
        assert response.status == 403
        assert await response.text() == "invalid link"


async def test_missing_file_is_not_found(server):
    session, base, signer, *_ = server
    async with session.get(signer.sign("17/drums.mp3", time.time() + 600)) as response:
        assert response.status == 404
    async with session.get(signer.sign("99/vocals.mp3", time.time() + 600)) as response:
        assert response.status == 404


async def test_symlinks_out_of_storage_are_refused_even_when_signed(server):
    session, base, signer, *_ = server
    for path in ("17/escape.mp3", "18/x.mp3"):
        async with session.get(signer.sign(path, time.time() + 600)) as response:
            assert response.status == 403, path
            assert "outside storage" not in await response.text()


@pytest.mark.parametrize("raw_path", [
    "/dl/17/..%2F..%2F..%2Fsecret.txt",   # storage/17/stems/../../../secret.txt
    "/dl/%2E%2E/x.mp3",                    # storage/../stems/x.mp3 is outside storage
    "/dl/%2E%2E/secret.txt",
    "/dl/17/%2E%2E",
    "/dl/17/stems%2Fvocals.mp3",
    "/dl/17/..%5C..%5C..%5Csecret.txt",
    "/dl/17/%2Fetc%2Fpasswd",
])
async def test_encoded_traversal_is_refused(server, raw_path):
    session, base, signer, *_ = server
    # Signed over the decoded path, as an attacker holding the secret could not do, to show
    # that the path checks refuse it even when the signature is right.
    decoded = unquote(raw_path.removeprefix("/dl/"))
    exp = int(time.time() + 600)
    query = f"?exp={exp}&sig={signer.signature(decoded, exp)}"
    async with session.get(URL(base + raw_path + query, encoded=True)) as response:
        assert response.status == 403, raw_path
        body = await response.text()
    assert "outside storage" not in body and STEM_BYTES.decode("latin-1") not in body


async def test_every_response_forbids_content_sniffing(server):
    session, base, signer, *_, ops = server
    good = signer.sign("17/vocals.mp3", time.time() + 600)
    urls = [
        good,                                               # 200
        signer.sign("17/vocals.mp3", time.time() - 1),      # 410
        good[:-4] + ("0000" if not good.endswith("0000") else "1111"),  # 403
        signer.sign("17/drums.mp3", time.time() + 600),     # 404
        signer.sign("17/escape.mp3", time.time() + 600),    # 403, out of storage
        f"{base}/nowhere",                                  # no route
        f"{base}/metrics",                                  # no route here: the operators' listener
        f"{ops}/livez", f"{ops}/readyz", f"{ops}/metrics", f"{ops}/nowhere",
    ]
    for url in urls:
        async with session.get(url) as response:
            assert response.headers.get("X-Content-Type-Options") == "nosniff", (url, response.status)
    # A partial download and a conditional one are answered by the file response itself.
    for headers in ({"Range": "bytes=0-9"}, {"Range": "bytes=999999-"}):
        async with session.get(good, headers=headers) as response:
            assert response.status in (206, 416)
            assert response.headers.get("X-Content-Type-Options") == "nosniff", headers


@pytest.mark.parametrize("spelling", ["+{exp}", "%20{exp}", "{exp}%20", "{head}_{tail}", "{wide}", "0x{hex}"])
async def test_an_expiry_that_is_not_plain_digits_is_an_invalid_link(server, spelling):
    session, base, signer, *_ = server
    url = signer.sign("17/vocals.mp3", time.time() + 600)
    exp = url.split("exp=")[1].split("&")[0]
    wide = quote("".join(chr(ord(c) - ord("0") + ord("\uff10")) for c in exp))  # full-width digits
    bad = spelling.format(exp=exp, head=exp[:4], tail=exp[4:], wide=wide, hex=f"{int(exp):x}")
    async with session.get(URL(url.replace(f"exp={exp}", f"exp={bad.replace('+', '%2B')}"), encoded=True)) as response:
        assert response.status == 403, bad
        assert await response.text() == "invalid link"


def test_the_operators_port_must_differ_from_the_public_one(monkeypatch):
    from pydantic import ValidationError

    from core.settings import Settings

    monkeypatch.setenv("STEMBOT_WEB_PORT", "9000")
    monkeypatch.setenv("STEMBOT_OPS_PORT", "9000")
    with pytest.raises(ValidationError, match="STEMBOT_OPS_PORT must differ from STEMBOT_WEB_PORT"):
        Settings(_env_file=None)
    monkeypatch.delenv("STEMBOT_OPS_PORT")
    settings = Settings(_env_file=None)
    assert (settings.ops_host, settings.ops_port) == ("127.0.0.1", 8081)
