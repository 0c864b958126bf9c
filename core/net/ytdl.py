"""Links to YouTube and SoundCloud pages, through yt-dlp. Optional and off by default.

Needs the `links` extra (`pip install stembot[links]`, i.e. yt-dlp). Only the named
extractors below are ever used (never `generic`, which would fetch any page), one track
at a time (no playlists, sets or channels), with the same limits as any other input:
the duration is checked from the page's info BEFORE anything is downloaded, and bytes
and wall time are capped while downloading. No proxy, no cookies, no config files, no
cache folder, no post-processing (yt-dlp would run ffmpeg on the file outside our limits;
`core.media.audio` decodes it like any upload), and no external downloaders.

Only one direct http(s) file is ever downloaded, by yt-dlp's own HTTP downloader. HLS and
DASH formats (m3u8, http_dash_segments, ...) are never chosen: for some of them (live
ones, or when it prefers to) yt-dlp hands the manifest to ffmpeg, which fetches every
segment outside the checks below, the protocol allow-list and the limits. A page that
offers nothing else is refused before anything is downloaded, and `YoutubeDL.dl` is
overridden to refuse any download that is not plain HTTP(S), should one get that far.

What is and is not guarded against reaching a non-public address:
- Every request yt-dlp makes goes through `YoutubeDL.urlopen`, which we override to run
  the checks of `core.net.fetcher` for a link (scheme, port, host form, and every DNS answer
  public or inside a network the operator allowed) first: the page, the site's API calls and the chosen media file.
- Not covered: redirects that yt-dlp's HTTP layer follows by itself are not re-checked,
  and yt-dlp resolves the name again when it connects, so the address is not pinned as
  in `core.net.fetcher` (a DNS answer that changes in between is not caught). The page must be
  on YouTube or SoundCloud and media comes from their CDNs, so both need those sites'
  DNS to turn hostile. Where that matters, run the bot with an egress firewall that drops
  private ranges.

yt-dlp runs in a child process of its own (`fetch_media`), started with a minimal
environment (`core.helper_env`) and holding none of the bot's memory: a page crafted to
exploit yt-dlp finds neither the Discord token nor any other secret of the bot's. The
child answers in JSON (a size, or an error of a known kind and its reason), never a
pickle, and is killed when it outlives its deadline.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from core.errors import (
    InputError,
    LinkNotAllowedError,
    NotAudioError,
    StembotError,
    TimedOutError,
    TooLargeError,
    TooLongError,
    UnreachableError,
)
from core.helper_env import CA_NAMES, HelperProcess, helper_env
from core.media.audio import Limits, format_duration
from core.net.fetcher import FetchRules, check_url, resolve_target_blocking, sniff_not_media

log = logging.getLogger(__name__)

# yt-dlp extractor keys that take one track. Their collection siblings (YoutubeTab,
# SoundcloudSet, SoundcloudUser, ...) are refused as playlists.
ALLOWED_EXTRACTORS = ("Youtube", "Soundcloud")
# Query parameters that turn a YouTube watch link into "this video, in this playlist".
_PLAYLIST_PARAMS = ("list", "index", "start_radio", "pp")


# The protocols downloaded (one file, by yt-dlp's HttpFD through the guarded `urlopen`), best first.
DIRECT_PROTOCOLS = ("https", "http")
# Best audio alone, else the best single file with audio; never a merge of two (ffmpeg).
FORMAT = "/".join(f"{quality}[protocol={proto}]" for quality in ("bestaudio", "best") for proto in DIRECT_PROTOCOLS)
STREAM_ONLY = "this track is only offered as a stream (HLS or DASH), not as a file to download"

# Hosts whose links go through yt-dlp rather than the plain fetcher.
STREAMING_HOSTS = ("youtube.com", "youtu.be", "youtube-nocookie.com", "soundcloud.com")


def is_streaming_link(url: str) -> bool:
    """Whether `url` points at YouTube or SoundCloud (cheap: no extractor is loaded)."""
    try:
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    return any(host == h or host.endswith("." + h) for h in STREAMING_HOSTS)


def available() -> bool:
    """Whether yt-dlp is installed."""
    try:
        import yt_dlp  # noqa: F401, PLC0415 - yt-dlp is an optional extra: is it installed?
    except ImportError:
        return False
    return True


def single_track_url(url: str) -> str:
    """`url` without the playlist part of a YouTube watch link (`?v=X&list=Y` -> `?v=X`)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(key == "v" for key, _ in query):
        return url
    kept = [(k, v) for k, v in query if k not in _PLAYLIST_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def extractor_for(url: str) -> str:
    """The key of the allowed extractor that takes `url`; LinkNotAllowedError otherwise."""
    from yt_dlp.extractor import gen_extractor_classes  # noqa: PLC0415 - yt-dlp is an optional extra

    keys = [ie.ie_key() for ie in gen_extractor_classes() if ie.ie_key() != "Generic" and ie.suitable(url)]
    for key in keys:
        if key in ALLOWED_EXTRACTORS:
            return key
    if any(key.startswith(ALLOWED_EXTRACTORS) for key in keys):
        raise LinkNotAllowedError("playlists, albums and channels are not accepted; send a link to one track")
    raise LinkNotAllowedError("links to this site are not accepted (only YouTube and SoundCloud)")


def check_info(info: dict, limits: Limits) -> None:
    """Refuse what the page says before anything is downloaded."""
    kind = info.get("_type", "video")
    if kind in ("playlist", "multi_video"):
        raise LinkNotAllowedError("playlists, albums and channels are not accepted; send a link to one track")
    if kind != "video":  # a pointer to another page, which could be any site
        raise LinkNotAllowedError("the link leads to another page; send a direct link to one track")
    if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming", "post_live"):
        raise LinkNotAllowedError("live streams are not accepted")
    duration = info.get("duration")
    if not isinstance(duration, (int, float)) or duration <= 0:
        raise LinkNotAllowedError("the length of this track is not known, so it is not accepted")
    if duration > limits.max_duration_s:
        raise TooLongError(f"the track is {format_duration(duration)} long, over the "
                           f"{format_duration(limits.max_duration_s)} limit")


def check_formats(info: dict) -> None:
    """Refuse a page whose formats are all streams (HLS, DASH, ...), before anything is downloaded."""
    from yt_dlp.utils import determine_protocol  # noqa: PLC0415 - yt-dlp is an optional extra

    formats = info.get("formats") or ([info] if info.get("url") else [])
    # What yt-dlp will call each format when it chooses one (a bare `.m3u8` URL is HLS).
    protocols = {determine_protocol(f) for f in formats if isinstance(f, dict) and (f.get("protocol") or f.get("url"))}
    if protocols and protocols.isdisjoint(DIRECT_PROTOCOLS):
        raise LinkNotAllowedError(STREAM_ONLY)


# Seconds the yt-dlp process gets past its own deadline (it checks it at every request
# and every chunk) before it is killed.
KILL_GRACE_S = 30.0
# The longest answer read from the yt-dlp process.
ANSWER_MAX_BYTES = 4096
# The errors the yt-dlp process may report, by name; anything else is a failed download.
_CHILD_ERRORS: dict[str, type[InputError]] = {
    cls.__name__: cls
    for cls in (LinkNotAllowedError, NotAudioError, TimedOutError, TooLargeError, TooLongError, UnreachableError)
}


def fetch_media(url: str, dest: Path, limits: Limits = Limits(), *, enabled: bool = False,
                timeout_s: float = 300.0, rules: FetchRules = FetchRules()) -> int:
    """Download the audio of one YouTube or SoundCloud track to `dest`; returns its size.
    Every request yt-dlp makes is checked against `rules` (a link's: public sites, and
    the operator's allowed networks).

    yt-dlp runs in a child process with a minimal environment (`download_track` there).
    Blocking: from async code, `await asyncio.to_thread(...)`.
    Raises an InputError for anything refused; a partial file never stays behind.
    """
    if not enabled:
        raise LinkNotAllowedError("links to video and music sites are turned off on this bot")
    if not available():
        raise LinkNotAllowedError("links to video and music sites need yt-dlp, which is not installed here")
    url = single_track_url(check_url(url, rules).url)
    key = extractor_for(url)  # matches the link only: no request is made here
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ytdl-", dir=dest.parent))
    done = False
    try:
        _download_in_child(url, key, dest, work, limits, timeout_s, rules)
        # What the child says is data: the file it left is checked here.
        if dest.is_symlink() or not dest.is_file():
            raise UnreachableError("nothing could be downloaded")
        size = dest.stat().st_size
        if size > limits.max_input_bytes:
            raise TooLargeError("the file is over the size limit")
        done = True
        return size
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done:
            dest.unlink(missing_ok=True)


def _download_in_child(url: str, key: str, dest: Path, work: Path, limits: Limits, timeout_s: float,
                       rules: FetchRules) -> None:
    """Run `download_track` in a child process with a minimal environment; raise what it reports."""
    receiver, sender = multiprocessing.get_context("spawn").Pipe(duplex=False)
    child = HelperProcess(target=_child_main, args=(sender, url, key, str(dest), str(work), limits, timeout_s,
                                                    rules),
                          name="stembot-ytdl", daemon=True, env=helper_env(CA_NAMES))
    answer = b""
    timed_out = False
    try:
        child.start()
        sender.close()  # the child's end closing then reads as the end
        if receiver.poll(timeout_s + KILL_GRACE_S):
            try:
                answer = receiver.recv_bytes(ANSWER_MAX_BYTES)
            except (EOFError, OSError):  # it died without answering, or answered too much
                pass
        else:
            timed_out = True
    finally:
        sender.close()
        receiver.close()
        if child.pid is not None:
            child.join(0 if timed_out else 5)
            if child.is_alive():
                child.kill()
                child.join()
    if timed_out:
        raise TimedOutError("the download took too long")
    _raise_unless_done(answer)


def _raise_unless_done(answer: bytes) -> None:
    try:
        reply = json.loads(answer)
    except ValueError:
        reply = None
    if isinstance(reply, dict):
        if reply.get("done") is True:
            return
        error = _CHILD_ERRORS.get(str(reply.get("error")))
        reason = reply.get("reason")
        if error is not None and isinstance(reason, str) and reason:
            raise error(reason[:300])
    raise UnreachableError("the page could not be read")


def _child_main(answer: Any, url: str, key: str, dest: str, work: str, limits: Limits, timeout_s: float,
                rules: FetchRules) -> None:
    """The child process: download, then answer in JSON on `answer` (a Connection)."""
    reply: dict[str, Any]
    try:
        download_track(url, key, Path(dest), Path(work), limits, timeout_s, rules)
        reply = {"done": True}
    except StembotError as exc:
        reply = {"error": type(exc).__name__, "reason": exc.reason}
    except Exception:  # a bug, or a page yt-dlp chokes on: logged here, a failed download there
        log.exception("yt-dlp failed on %s", url)
        reply = {"error": "UnreachableError", "reason": "the page could not be read"}
    answer.send_bytes(json.dumps(reply).encode())
    answer.close()


def download_track(url: str, key: str, dest: Path, work: Path, limits: Limits, timeout_s: float,
                   rules: FetchRules = FetchRules()) -> int:
    """Download one track to `dest` with the extractor `key`, in this process, through
    `work` (an empty folder that the caller removes): what `fetch_media` runs in its child
    process. Returns its size."""
    return _run(url, key, dest, work, limits, time.monotonic() + timeout_s, rules)


def guarded_downloader(params: dict[str, Any], deadline: float,
                       rules: FetchRules = FetchRules()) -> Any:  # yt-dlp: untyped
    """A YoutubeDL with no extractors loaded whose every request is first checked like a
    user's link (and against `deadline`, a `time.monotonic()` value)."""
    import yt_dlp  # noqa: PLC0415 - yt-dlp is an optional extra
    from yt_dlp.downloader import get_suitable_downloader  # noqa: PLC0415 - yt-dlp is an optional extra
    from yt_dlp.downloader.http import HttpFD  # noqa: PLC0415 - yt-dlp is an optional extra
    from yt_dlp.utils import determine_protocol  # noqa: PLC0415 - yt-dlp is an optional extra

    class GuardedYoutubeDL(yt_dlp.YoutubeDL):
        def urlopen(self, req: Any) -> Any:
            if time.monotonic() > deadline:
                raise TimedOutError("the download took too long")
            target_url = req if isinstance(req, str) else getattr(req, "url", None) or req.full_url
            resolve_target_blocking(check_url(target_url, rules), rules)
            return super().urlopen(req)

        def dl(self, name: str, info: dict, subtitle: bool = False, test: bool = False) -> Any:
            # The last guard: whatever the format selection let through, only yt-dlp's own
            # HTTP downloader runs (ffmpeg, HLS, DASH or rtmpdump would fetch outside `urlopen`).
            # get_suitable_downloader writes into the dict it is given, hence the copy.
            if (not info.get("url") or determine_protocol(info) not in DIRECT_PROTOCOLS
                    or get_suitable_downloader(dict(info), self.params) is not HttpFD):
                raise LinkNotAllowedError(STREAM_ONLY)
            return super().dl(name, info, subtitle=subtitle, test=test)

    return GuardedYoutubeDL(params, auto_init=False)


def downloader_params(work: Path, limits: Limits, deadline: float) -> dict:
    """yt-dlp's options: one track into `work`, within `limits` and before `deadline`."""

    def on_progress(status: dict) -> None:
        if time.monotonic() > deadline:
            raise TimedOutError("the download took too long")
        if (status.get("downloaded_bytes") or 0) > limits.max_input_bytes:
            raise TooLargeError("the file is over the size limit")

    return {
        # One direct http(s) file: HLS and DASH may go to ffmpeg, rtmp and rtsp to other
        # programs, all outside the guarded `urlopen` and the limits.
        "format": FORMAT,
        "external_downloader": {"default": "native"},  # never aria2c, curl, or ffmpeg
        "hls_prefer_native": True,  # belt and braces: HLS is not selected at all
        "allow_unplayable_formats": False,
        "outtmpl": {"default": str(work / "media.%(ext)s")},
        "noplaylist": True,
        "max_filesize": limits.max_input_bytes,
        "proxy": "",                # a direct connection, never a proxy from the environment
        "cookiefile": None,
        "cachedir": False,
        "socket_timeout": 20,
        "retries": 1,
        "fragment_retries": 1,
        "extractor_retries": 1,
        "concurrent_fragment_downloads": 1,
        "fixup": "never",           # fixups run ffmpeg on the file, outside core.media.audio's limits
        "postprocessors": [],
        "check_formats": False,
        "progress_hooks": [on_progress],
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": log,
    }


def _run(url: str, key: str, dest: Path, work: Path, limits: Limits, deadline: float,
         rules: FetchRules) -> int:
    from yt_dlp.utils import DownloadError, ExtractorError  # noqa: PLC0415 - yt-dlp is an optional extra

    params = downloader_params(work, limits, deadline)
    try:
        with guarded_downloader(params, deadline, rules) as ydl:
            ydl.get_info_extractor(key)  # loads this one extractor, and no other
            info = ydl.extract_info(url, download=False, ie_key=key, process=False)
            check_info(info, limits)
            check_formats(info)
            ydl.process_ie_result(info, download=True)
    except StembotError:
        raise
    except DownloadError as exc:
        cause = exc.exc_info[1] if exc.exc_info else None
        if isinstance(cause, StembotError):
            raise cause from None
        raise UnreachableError(_short(exc.msg or str(exc))) from None
    except ExtractorError as exc:
        raise UnreachableError(_short(exc.msg or str(exc))) from None

    files = [p for p in work.glob("media.*") if p.is_file() and not p.name.endswith((".part", ".ytdl"))]
    if not files:  # yt-dlp skips a file over max_filesize instead of failing
        raise TooLargeError("the file is over the size limit, or nothing could be downloaded")
    media = files[0]
    size = media.stat().st_size
    if size > limits.max_input_bytes:
        raise TooLargeError("the file is over the size limit")
    with open(media, "rb") as f:
        what = sniff_not_media(f.read(4096))
    if what:
        raise NotAudioError(f"the file is {what}, not audio or video")
    media.replace(dest)
    return size


def _short(message: str) -> str:
    """yt-dlp's message, without its `ERROR: [youtube] id:` prefix, on one short line."""
    text = message.splitlines()[0] if message else "the site refused the link"
    text = text.removeprefix("ERROR: ")
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
        text = text.split(": ", 1)[-1] if ": " in text[:40] else text
    return f"the site refused the link: {text[:200]}"
