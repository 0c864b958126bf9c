"""`stembot separate URL`: links are fetched safely, separated like files, and refused with
one `error: <url>: <reason>` line each. The loopback server is reached as an operator would
reach an intranet server: STEMBOT_FETCH_ALLOWED_NETWORKS=127.0.0.0/8, the bot's setting."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from core.media.stem_files import MARKER
from core.net.urls import is_link, link_output_name, output_name
from tests.stembot.test_cli import stembot
from tests.support.media import music


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny web server on 127.0.0.1: /song.wav, /My%20Track.wav, /page.mp3 (HTML), /big.wav."""
    song = music(tmp_path_factory.mktemp("site") / "song.wav", seconds=3.0, extra=("-c:a", "pcm_s16le")).read_bytes()
    bodies = {
        "/song.wav": ("audio/wav", song),
        "/My%20Track.wav": ("audio/wav", song),
        "/page.mp3": ("audio/mpeg", b"<!DOCTYPE html><html><body>sign in to download</body></html>"),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            content_type, body = bodies.get(self.path, ("text/plain", b""))
            self.send_response(200 if self.path in bodies else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_links_are_fetched_separated_and_refused_one_line_each(tmp_path, model_dir, site):
    temp = tmp_path / "tmp"
    temp.mkdir()
    good, spaced = f"{site}/song.wav", f"{site}/My%20Track.wav"
    metadata, page, missing = "http://169.254.169.254/latest/meta-data/", f"{site}/page.mp3", f"{site}/nope.wav"
    out = tmp_path / "out"
    done = stembot("separate", good, spaced, metadata, page, missing, "-o", str(out), "--model", "tiny",
                   "--model-dir", str(model_dir), "--stems", "karaoke", "--format", "wav", "--quiet",
                   env={"STEMBOT_FETCH_ALLOWED_NETWORKS": "127.0.0.0/8", "TMPDIR": str(temp)})
    assert done.returncode == 1, done.stderr
    errors = {line.split(": ", 2)[1]: line.split(": ", 2)[2]
              for line in done.stderr.splitlines() if line.startswith("error: ")}
    assert set(errors) == {metadata, page, missing}, done.stderr
    assert "private" in errors[metadata]
    assert "web page" in errors[page]
    assert "HTTP 404" in errors[missing]
    assert "2 of 5 tracks separated" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["My Track", "song"]
    assert sorted(p.name for p in (out / "song").iterdir()) == [MARKER, "no_vocals.wav", "vocals.wav"]
    assert list(temp.iterdir()) == []  # downloads were removed


def test_by_default_loopback_links_are_refused(tmp_path, model_dir, site):
    url, other_network = f"{site}/song.wav", f"{site.replace('127.0.0.1', '10.0.0.1')}/song.wav"
    done = stembot("separate", url, "ftp://example.com/other.wav", "-o", str(tmp_path / "out"), "--model", "tiny",
                   "--model-dir", str(model_dir), "--quiet", env={"STEMBOT_FETCH_ALLOWED_NETWORKS": ""})
    assert done.returncode == 1
    assert f"error: {url}: only links on the standard web ports (80 and 443) are allowed" in done.stderr
    assert "error: ftp://example.com/other.wav: only http and https links are allowed" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # An allowed network opens itself, nothing beside it.
    done = stembot("separate", other_network, "-o", str(tmp_path / "out"), "--model", "tiny",
                   "--model-dir", str(model_dir), "--quiet", env={"STEMBOT_FETCH_ALLOWED_NETWORKS": "127.0.0.0/8"})
    assert done.returncode == 1
    assert f"error: {other_network}: the link points to a private or reserved network address" in done.stderr


@pytest.mark.parametrize("url,name", [
    ("https://cdn.discordapp.com/attachments/1/2/My%20Song.mp3?ex=1", "My Song"),
    ("https://example.com/a/b/track.flac", "track"),
    ("https://example.com/music/", "music"),
    ("https://example.com/", "example.com"),
    ("https://example.com/..%2F..%2Fetc%2Fpasswd", "passwd"),
    ("https://example.com/%2E%2E", "example.com"),
    ("https://example.com/a%00b%0A.mp3", "a_b"),
    ("https://example.com/Ünïcode%20名前.ogg", "Ünïcode 名前"),
    ("http://[::1/", "download"),
])
def test_output_folder_name_from_a_link(url, name):
    assert link_output_name(url) == name
    assert output_name(url) == name
    assert "/" not in name and not name.startswith(".")


def test_what_counts_as_a_link():
    assert is_link("https://x.org/a.mp3") and is_link("HTTP://x.org/") and is_link("ftp://x.org/a")
    assert not is_link("song.mp3") and not is_link("./http:/x") and not is_link(Path("http://x.org/a"))
