"""The stem player's page on the public listener (core.ops.web + core.ops.player): signed and
expiring like downloads, under a strict Content-Security-Policy, and the job's data only as JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import aiohttp
import pytest

from core.ops import player as player_page
from core.ops.web import build_public_app, start_web, stop_web
from core.storage.signed_links import LinkSigner

SECRET = b"p" * 32
TITLE = 'My </script><script>alert(1)</script> "song" & {{MANIFEST}}.mp3'


@pytest.fixture
async def server(tmp_path):
    """(session, signer for the listener's address, the jobs asked for)."""
    asked: list[tuple[int, int]] = []
    signer = LinkSigner(SECRET, "http://unused")

    async def manifest(job_id: int, expires_at: int):
        asked.append((job_id, expires_at))
        if job_id != 7:
            return None
        presigned = f"https://bucket.s3.example.com/stembot/jobs/7/checked/drums.mp3?X-Amz-Signature={'a' * 64}"
        links = {"vocals.mp3": signer.sign("7/vocals.mp3", expires_at), "drums.mp3": presigned}
        return player_page.manifest(title=TITLE, links=links, expires_at=expires_at, bpm=98.5, key="F# minor")

    runner = await start_web(build_public_app(storage_root=tmp_path, signer=signer, player=manifest), "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    signer.base_url = f"http://{host}:{port}"
    async with aiohttp.ClientSession() as session:
        yield session, signer, asked
    await stop_web(runner)


def manifest_of(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="manifest">(.*?)</script>', page, re.S)
    assert block is not None
    return json.loads(block.group(1))


async def test_the_page_has_a_strict_policy_and_the_job_as_json(server, caplog):
    session, signer, asked = server
    url = signer.sign_player(7, time.time() + 600)
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        async with session.get(url) as response:
            assert response.status == 200
            page = await response.text()
            headers = response.headers
        for _ in range(100):
            if caplog.records:
                break
            await asyncio.sleep(0.01)
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self';" in policy and "style-src 'self';" in policy
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    # Stems from the object store: its origin, and only it, besides this one (by its public address).
    connect = re.search(r"connect-src ([^;]*);", policy).group(1).split()
    assert connect == ["'self'", signer.base_url, "https://bucket.s3.example.com"]
    assert headers["Referrer-Policy"] == "no-referrer" and "no-store" in headers["Cache-Control"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Every script is a file of this site; the data is JSON that no title can break out of.
    assert re.findall(r"<script[^>]*>", page) == ['<script type="application/json" id="manifest">',
                                                  '<script src="assets/mixer.js" defer>',
                                                  '<script src="assets/player.js" defer>']
    data = manifest_of(page)
    assert data["title"] == TITLE and data["bpm"] == 98.5 and data["key"] == "F# minor"
    assert [(s["name"], s["colour"]) for s in data["stems"]] == [("vocals", "#ff5c8a"), ("drums", "#ffb347")]
    assert data["stems"][0]["url"].startswith(f"{signer.base_url}/dl/7/vocals.mp3?exp=")
    assert asked == [(7, int(url.split("exp=")[1].split("&")[0]))]
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page.split("<body")[1]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/player/7" in logged and "sig=" not in logged and "exp=" not in logged


async def test_expired_and_tampered_links_are_refused(server):
    session, signer, asked = server
    good = signer.sign_player(7, time.time() + 600)
    cases = {
        signer.sign_player(7, time.time() - 1): 410,
        good.replace("/player/7?", "/player/8?"): 403,
        good[:-1] + ("0" if good[-1] != "0" else "1"): 403,
        good.split("?")[0]: 403,
        # A download link's signature is not a player's, nor the other way round.
        signer.sign("7/vocals.mp3", time.time() + 600).replace("/dl/7/vocals.mp3", "/player/7"): 403,
        good.replace("/player/7?", "/dl/7/player?"): 404,
        good.replace("/player/7?", "/player/7a?"): 403,
    }
    for url, status in cases.items():
        async with session.get(url) as response:
            assert response.status == status, url
            assert "Content-Security-Policy" not in response.headers or status == 200
    assert asked == [], "nothing is looked up for a refused link"


async def test_a_job_without_stems_is_not_found(server):
    session, signer, _ = server
    async with session.get(signer.sign_player(8, time.time() + 600)) as response:
        assert response.status == 404
        assert "deleted" in await response.text()


async def test_assets_are_the_packages_files_only(server):
    session, signer, _ = server
    for name, kind in (("player.js", "text/javascript"), ("mixer.js", "text/javascript"),
                       ("player.css", "text/css")):
        async with session.get(f"{signer.base_url}/player/assets/{name}") as response:
            assert response.status == 200 and response.content_type == kind
            assert await response.read() == (player_page.ASSETS_DIR / name).read_bytes()
    for name in ("__init__.py", "index.html", "..%2F__init__.py", "%2e%2e"):
        async with session.get(f"{signer.base_url}/player/assets/{name}") as response:
            assert response.status == 404, name


async def test_no_player_without_a_manifest(tmp_path):
    signer = LinkSigner(SECRET, "http://unused")
    runner = await start_web(build_public_app(storage_root=tmp_path, signer=signer), "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    signer.base_url = f"http://{host}:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for path in (signer.sign_player(7, time.time() + 600), f"{signer.base_url}/player/assets/player.js"):
                async with session.get(path) as response:
                    assert response.status == 404
    finally:
        await stop_web(runner)


def test_the_package_ships_its_files():
    for name in (player_page.PAGE, *player_page.ASSETS):
        assert (player_page.ASSETS_DIR / name).is_file()
