"""The dispatcher fetches a job's input under the rules of its kind, as the operator set them
(settings -> Runtime -> Dispatcher): an attachment only from the Discord CDN origins
(STEMBOT_DISCORD_CDN_URL), a link from public sites and the allowed networks
(STEMBOT_FETCH_ALLOWED_NETWORKS). Checked again here, whatever the command checked first:
a job row is fetched by whichever bot or restart picks it up."""

from __future__ import annotations

import pytest
import pytest_asyncio
from aiohttp import web

from core.host.handle import HostHandle
from core.jobs.dispatcher import Dispatcher
from core.jobs.embedded_execution import EmbeddedExecution
from core.net.fetcher import NOT_ON_CDN
from core.runtime import Runtime
from core.settings import Settings
from tests.support.media import music
from tests.support.silent_notifier import Silent


class Site:
    """A web server on 127.0.0.1 that serves a song at any path and counts its requests."""

    def __init__(self, song: bytes):
        self.song = song
        self.requests: list[str] = []
        self.origin = ""

    async def serve(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        return web.Response(body=self.song, content_type="audio/wav")


async def start_site(song: bytes):
    site = Site(song)
    app = web.Application()
    app.router.add_get("/{tail:.*}", site.serve)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    site.origin = f"http://127.0.0.1:{tcp._server.sockets[0].getsockname()[1]}"
    return site, runner


@pytest_asyncio.fixture
async def sites(tmp_path):
    """The CDN of a self-hosted Discord-compatible server, and another server: both on loopback."""
    song = music(tmp_path / "song.wav", seconds=2.0).read_bytes()
    cdn, cdn_runner = await start_site(song)
    other, other_runner = await start_site(song)
    yield cdn, other
    await cdn_runner.cleanup()
    await other_runner.cleanup()


@pytest_asyncio.fixture
async def make_dispatcher(sqlite_url, tmp_path):
    runtimes: list[Runtime] = []

    def make(**settings: str) -> Dispatcher:
        runtime = Runtime.from_settings(Settings(_env_file=None, data_dir=tmp_path / "data", database_url=sqlite_url,
                                                 **settings))
        runtimes.append(runtime)
        execution = EmbeddedExecution(HostHandle(runtime.host_config()))  # attached, never started
        return Dispatcher(runtime.store, runtime.storage, Silent(), execution, runtime.dispatcher_config("local"))

    yield make
    for runtime in runtimes:
        await runtime.close()


async def prepare(dispatcher: Dispatcher, kind: str, url: str):
    job = await dispatcher.store.create(user_id=1, source_kind=kind, source_url=url, source_name="song.wav",
                                        model="tiny", stems="all", format="mp3")
    went_on = await dispatcher.prepare(job)
    return went_on, await dispatcher.store.get(job.id)


async def test_an_attachment_on_the_configured_origin_is_fetched_even_on_loopback(sites, make_dispatcher):
    cdn, other = sites
    dispatcher = make_dispatcher(discord_cdn_url=cdn.origin)  # and no allowed network
    went_on, job = await prepare(dispatcher, "attachment", f"{cdn.origin}/attachments/1/song.wav")
    assert went_on and job.state == "queued" and job.source_size == len(cdn.song)
    assert dispatcher.storage.input_path(job.id, job.source_name).read_bytes() == cdn.song


@pytest.mark.parametrize("where", ["other", "public", "same server, another name"])
async def test_an_attachment_anywhere_else_fails_unfetched(sites, make_dispatcher, where):
    cdn, other = sites
    url = {"other": f"{other.origin}/attachments/1/song.wav",
           "public": "https://cdn.example.com/attachments/1/song.wav",
           "same server, another name": f"{cdn.origin.replace('127.0.0.1', 'localhost')}/attachments/1/song.wav",
           }[where]
    # Links may reach loopback here: an attachment still may not.
    dispatcher = make_dispatcher(discord_cdn_url=cdn.origin, fetch_allowed_networks="127.0.0.0/8")
    went_on, job = await prepare(dispatcher, "attachment", url)
    assert not went_on
    assert (job.state, job.error_kind, job.error) == ("failed", "link_not_allowed", NOT_ON_CDN)
    assert cdn.requests == other.requests == []


async def test_a_link_goes_by_the_link_rules(sites, make_dispatcher):
    cdn, other = sites
    url = f"{other.origin}/song.wav"
    refused, job = await prepare(make_dispatcher(discord_cdn_url=cdn.origin), "url", url)
    assert not refused and job.state == "failed" and "standard web ports" in job.error  # nothing opened by default
    assert other.requests == []
    went_on, job = await prepare(make_dispatcher(discord_cdn_url=cdn.origin, fetch_allowed_networks="127.0.0.0/8"),
                                 "url", url)
    assert went_on and other.requests == ["/song.wav"]
    # The CDN's origin is no exception for a link: only the allowed networks opened it.
    refused, job = await prepare(make_dispatcher(discord_cdn_url=cdn.origin), "url", f"{cdn.origin}/song.wav")
    assert not refused and cdn.requests == []
