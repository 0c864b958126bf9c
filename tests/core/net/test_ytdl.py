"""core.net.ytdl: the refusal paths, without any network (yt-dlp's extraction is faked where a
test needs a page's info, in this process: `fetch_here` runs the download as fetch_media's child
process does), and the child process itself."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from core.errors import LinkNotAllowedError, NotAudioError, TimedOutError, TooLongError, UnreachableError
from core.media.audio import Limits
from core.net import ytdl
from tests.support.secrets_env import ChildWatcher, leaked, put_secrets

needs_yt_dlp = pytest.mark.skipif(not ytdl.available(), reason="yt-dlp (the `links` extra) is not installed")
LIMITS = Limits(max_duration_s=600, max_input_bytes=10 * 2**20)
VIDEO = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"


def fetch_here(url: str, dest: Path) -> int:
    """What fetch_media's child process runs, in this process, with the work folder made and
    removed around it as fetch_media does."""
    work = Path(tempfile.mkdtemp(prefix=".ytdl-", dir=dest.parent))
    try:
        return ytdl.download_track(url, "Youtube", dest, work, LIMITS, timeout_s=60)
    finally:
        shutil.rmtree(work)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_off_by_default(tmp_path):
    with pytest.raises(LinkNotAllowedError, match="turned off"):
        ytdl.fetch_media(VIDEO, tmp_path / "song", LIMITS)


def test_refused_when_yt_dlp_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(ytdl, "available", lambda: False)
    with pytest.raises(LinkNotAllowedError, match="not installed"):
        ytdl.fetch_media(VIDEO, tmp_path / "song", LIMITS, enabled=True)


@needs_yt_dlp
@pytest.mark.parametrize("url,words", [
    ("http://example.com/song.mp3", "only YouTube and SoundCloud"),
    ("https://vimeo.com/76979871", "only YouTube and SoundCloud"),
    ("https://www.youtube.com/playlist?list=PLFgquLnL59alCl_2TQvOiD5Vgm1hCaGSI", "playlists"),
    ("https://www.youtube.com/@SomeChannel/videos", "playlists"),
    ("https://soundcloud.com/artist/sets/an-album", "playlists"),
    ("https://soundcloud.com/artist", "playlists"),
    ("https://www.youtube.com:8080/watch?v=dQw4w9WgXcQ", "standard web ports"),
    ("http://127.0.0.1/watch?v=dQw4w9WgXcQ", "loopback"),
    ("file:///etc/passwd", "only http and https"),
])
def test_links_other_than_one_track_are_refused(tmp_path, url, words):
    started = time.monotonic()
    with pytest.raises(LinkNotAllowedError, match=words):
        ytdl.fetch_media(url, tmp_path / "song", LIMITS, enabled=True)
    assert time.monotonic() - started < 5
    assert list(tmp_path.iterdir()) == []


@needs_yt_dlp
def test_a_watch_link_inside_a_playlist_means_that_one_video():
    url = ytdl.single_track_url(VIDEO + "&list=PL123&index=4&t=42")
    assert url == VIDEO + "&t=42"
    assert ytdl.extractor_for(url) == "Youtube"
    assert ytdl.extractor_for("https://soundcloud.com/artist/a-track") == "Soundcloud"


@pytest.mark.parametrize("info,error,words", [
    ({"_type": "playlist", "entries": []}, LinkNotAllowedError, "playlists"),
    ({"_type": "url", "url": "http://10.0.0.1/"}, LinkNotAllowedError, "another page"),
    ({"_type": "url_transparent", "url": "http://example.com/"}, LinkNotAllowedError, "another page"),
    ({"duration": 100, "is_live": True}, LinkNotAllowedError, "live"),
    ({"duration": 100, "live_status": "is_upcoming"}, LinkNotAllowedError, "live"),
    ({}, LinkNotAllowedError, "not known"),
    ({"duration": 601}, TooLongError, "over the 10:00 limit"),
])
def test_the_page_info_is_checked(info, error, words):
    with pytest.raises(error, match=words):
        ytdl.check_info(info, LIMITS)


@needs_yt_dlp
def test_every_request_yt_dlp_makes_is_vetted_first():
    ydl = ytdl.guarded_downloader({"quiet": True}, time.monotonic() + 60)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[::1]/", "http://10.0.0.1/a.m4a",
                "https://rr1---sn.googlevideo.com:8443/videoplayback", "ftp://example.com/x"):
        with pytest.raises(LinkNotAllowedError):
            ydl.urlopen(url)
        with pytest.raises(LinkNotAllowedError):
            ydl.urlopen(_request(url))
    late = ytdl.guarded_downloader({"quiet": True}, time.monotonic() - 1)
    with pytest.raises(TimedOutError):
        late.urlopen("https://www.youtube.com/")


@needs_yt_dlp
def test_options_are_locked_down(tmp_path):
    params = ytdl.downloader_params(tmp_path, LIMITS, time.monotonic() + 60)
    assert params["proxy"] == "" and params["cookiefile"] is None and params["cachedir"] is False
    assert params["noplaylist"] is True and params["max_filesize"] == LIMITS.max_input_bytes
    assert params["external_downloader"] == {"default": "native"} and params["fixup"] == "never"
    assert params["postprocessors"] == []
    # One direct http(s) file, never HLS or DASH, never a merge (ffmpeg).
    assert params["format"] == ytdl.FORMAT == ("bestaudio[protocol=https]/bestaudio[protocol=http]/"
                                               "best[protocol=https]/best[protocol=http]")
    assert params["hls_prefer_native"] is True and params["allow_unplayable_formats"] is False
    ydl = ytdl.guarded_downloader(params, time.monotonic() + 60)
    assert ydl.proxies == {"all": "__noproxy__"}
    assert ydl._ies == {}  # no extractor loaded, least of all `generic`
    ydl.build_format_selector(params["format"])  # the format spec parses


def _request(url: str):
    from yt_dlp.networking import Request

    return Request(url)


class FakeSite:
    """Stands in for yt-dlp's network side: what the page says, and what gets written."""

    def __init__(self, monkeypatch, info: dict, body: bytes = b""):
        self.info = info
        self.body = body
        self.downloads = 0
        site = self

        def extract_info(ydl, url, download=True, ie_key=None, process=True, **kwargs):
            assert ie_key == "Youtube" and download is False and process is False
            assert list(ydl._ies) == ["Youtube"]
            return dict(site.info)

        def process_ie_result(ydl, info, download=True, extra_info=None):
            site.downloads += 1
            Path(ydl.params["outtmpl"]["default"].replace("%(ext)s", "m4a")).write_bytes(site.body)
            return info

        monkeypatch.setattr("yt_dlp.YoutubeDL.extract_info", extract_info)
        monkeypatch.setattr("yt_dlp.YoutubeDL.process_ie_result", process_ie_result)


@needs_yt_dlp
def test_duration_is_checked_before_anything_is_downloaded(tmp_path, monkeypatch):
    site = FakeSite(monkeypatch, {"id": "x", "duration": 3600, "title": "a long mix"})
    with pytest.raises(TooLongError):
        fetch_here(VIDEO, tmp_path / "song")
    assert site.downloads == 0 and list(tmp_path.iterdir()) == []


@needs_yt_dlp
def test_a_track_is_downloaded_to_dest_and_the_work_folder_removed(tmp_path, monkeypatch):
    body = b"\x00\x00\x00\x20ftypM4A " + bytes(5000)
    site = FakeSite(monkeypatch, {"id": "x", "duration": 200}, body)
    size = fetch_here(VIDEO, tmp_path / "song")
    assert size == len(body) and (tmp_path / "song").read_bytes() == body and site.downloads == 1
    assert [p.name for p in tmp_path.iterdir()] == ["song"]


@needs_yt_dlp
def test_a_download_that_is_not_media_is_refused(tmp_path, monkeypatch):
    FakeSite(monkeypatch, {"id": "x", "duration": 200}, b"<!DOCTYPE html><html>consent</html>")
    with pytest.raises(NotAudioError, match="web page"):
        fetch_here(VIDEO, tmp_path / "song")
    assert list(tmp_path.iterdir()) == []


# -- only one direct file, through yt-dlp's own HTTP downloader ------------------------------

M4A = b"\x00\x00\x00\x20ftypM4A " + bytes(5000)


def _format(format_id: str, url: str, abr: float, protocol: str | None = None) -> dict:
    fmt = {"format_id": format_id, "url": url, "ext": "m4a", "acodec": "mp4a.40.2", "vcodec": "none", "abr": abr}
    if protocol:
        fmt["protocol"] = protocol
    return fmt


# Better quality first as a stream, so a selection that lets streams through picks one.
HLS = _format("hls-256", "https://cdn.example.com/a/index.m3u8", 256)  # protocol left to yt-dlp: m3u8_native
DASH = _format("dash-192", "https://cdn.example.com/a/manifest.mpd", 192, "http_dash_segments")
LIVE_HLS = _format("hls-live", "https://cdn.example.com/live.m3u8", 160, "m3u8")
DIRECT = _format("direct-128", "https://cdn.example.com/a/audio.m4a", 128, "https")


@pytest.fixture
def http_downloads(monkeypatch):
    """yt-dlp's native HTTP downloader, writing a song instead of reaching the network; the URLs it got."""
    from yt_dlp.downloader.http import HttpFD

    urls: list[str] = []

    def real_download(fd, filename, info_dict):
        urls.append(info_dict["url"])
        Path(filename).write_bytes(M4A)
        return True

    monkeypatch.setattr(HttpFD, "real_download", real_download)
    return urls


def _page(monkeypatch, *formats: dict) -> None:
    """Fakes the extraction only: yt-dlp's own format selection and download choice run."""
    def extract_info(ydl, url, download=True, ie_key=None, process=True, **kwargs):
        return {"id": "x", "title": "a song", "duration": 200, "extractor": "youtube", "extractor_key": "Youtube",
                "webpage_url": url, "formats": [dict(f) for f in formats]}

    monkeypatch.setattr("yt_dlp.YoutubeDL.extract_info", extract_info)


@needs_yt_dlp
@pytest.mark.parametrize("formats", [(HLS,), (DASH,), (HLS, DASH, LIVE_HLS)], ids=["hls", "dash", "mixed"])
def test_a_page_that_only_offers_streams_is_refused(tmp_path, monkeypatch, http_downloads, formats):
    _page(monkeypatch, *formats)
    with pytest.raises(LinkNotAllowedError, match="only offered as a stream"):
        fetch_here(VIDEO, tmp_path / "song")
    assert http_downloads == [] and list(tmp_path.iterdir()) == []


@needs_yt_dlp
def test_the_direct_https_file_is_chosen_over_better_streams(tmp_path, monkeypatch, http_downloads):
    _page(monkeypatch, HLS, DASH, LIVE_HLS, DIRECT)
    assert fetch_here(VIDEO, tmp_path / "song") == len(M4A)
    assert http_downloads == [DIRECT["url"]] and (tmp_path / "song").read_bytes() == M4A


@needs_yt_dlp
def test_the_format_selection_keeps_direct_files_only(tmp_path):
    from yt_dlp.downloader import get_suitable_downloader
    from yt_dlp.downloader.http import HttpFD

    params = ytdl.downloader_params(tmp_path, LIMITS, time.monotonic() + 60)
    ydl = ytdl.guarded_downloader(params, time.monotonic() + 60)
    info = {"id": "x", "title": "a song", "extractor": "youtube", "extractor_key": "Youtube",
            "webpage_url": VIDEO, "formats": [dict(f) for f in (HLS, DASH, LIVE_HLS, DIRECT)]}
    chosen = ydl.process_ie_result(info, download=False)
    assert chosen["format_id"] == DIRECT["format_id"] and "requested_formats" not in chosen
    assert get_suitable_downloader(dict(chosen), params) is HttpFD
    plain_http = dict(DIRECT, format_id="plain", url="http://cdn.example.com/a.m4a", protocol="http")
    assert ydl.process_ie_result(dict(info, formats=[HLS, plain_http]), download=False)["format_id"] == "plain"


@needs_yt_dlp
@pytest.mark.parametrize("fmt", [HLS, DASH, LIVE_HLS, _format("rtmp", "rtmp://cdn.example.com/a", 128)],
                         ids=["hls", "dash", "live-hls", "rtmp"])
def test_the_downloader_itself_refuses_anything_but_one_direct_file(tmp_path, fmt, http_downloads):
    """The last guard, should a format get past the selection: yt-dlp's `dl` is never given a stream."""
    params = ytdl.downloader_params(tmp_path, LIMITS, time.monotonic() + 60)
    ydl = ytdl.guarded_downloader(params, time.monotonic() + 60)
    with pytest.raises(LinkNotAllowedError, match="only offered as a stream"):
        ydl.dl(str(tmp_path / "media.m4a"), dict(fmt, id="x"))
    assert http_downloads == []


# -- the child process -------------------------------------------------------------------------


@needs_yt_dlp
def test_yt_dlp_runs_in_a_child_process_without_the_secrets(tmp_path, monkeypatch):
    put_secrets(monkeypatch)
    # No time at all: the child's first request (its own guarded `urlopen`) times out, before any network.
    with ChildWatcher() as watcher, pytest.raises(TimedOutError, match="took too long"):
        ytdl.fetch_media(VIDEO, tmp_path / "song", LIMITS, enabled=True, timeout_s=0)
    assert len(watcher.seen) == 1, "the yt-dlp child process was not seen"
    assert [leaked(raw) for raw in watcher.seen.values()] == [[]]
    assert list(tmp_path.iterdir()) == []  # its work folder removed


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(tempfile.gettempdir()) / "stembot-ytdl-answer-was-unpickled",))


@pytest.mark.parametrize("answer,error,words", [
    (json.dumps({"error": "TooLongError", "reason": "the track is 30:00 long"}).encode(), TooLongError, "30:00"),
    (json.dumps({"error": "SystemExit", "reason": "bye"}).encode(), UnreachableError, "could not be read"),
    (json.dumps({"done": "yes"}).encode(), UnreachableError, "could not be read"),
    (b"", UnreachableError, "could not be read"),  # it died without answering
    (pickle.dumps(_Boom()), UnreachableError, "could not be read"),
])
def test_what_the_child_answers_is_data(answer, error, words):
    with pytest.raises(error, match=words):
        ytdl._raise_unless_done(answer)
    assert not (Path(tempfile.gettempdir()) / "stembot-ytdl-answer-was-unpickled").exists()
    ytdl._raise_unless_done(json.dumps({"done": True}).encode())
