"""core.net.fetcher: hostile links refused without touching the network, and a real loopback
server for downloads, redirects, caps and sniffing (reached as an operator would reach an
intranet server: 127.0.0.0/8 in the link rules' allowed networks)."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import socket
import time

import pytest
from aiohttp import web

from core.errors import InputError, LinkNotAllowedError, UnreachableError
from core.net.fetcher import (
    DISCORD_CDN_ORIGINS,
    NOT_ON_CDN,
    OFF_CDN_REDIRECT,
    FetchRules,
    Origin,
    SourceRules,
    address_problem,
    check_url,
    download,
    parse_origin,
    sniff_not_media,
    vet_addresses,
)
from core.settings import Settings
from tests.support.media import music

MB = 2**20
# The tests' loopback servers, as an operator's trusted network.
LOOPBACK = FetchRules.for_links(["127.0.0.0/8"])

# -- links refused before any lookup or connection -------------------------------------------

HOSTILE_URLS = [
    # schemes
    "file:///etc/passwd",
    "ftp://example.com/song.mp3",
    "gopher://example.com:70/_GET%20/",
    "data:audio/mpeg;base64,SUQzBAA=",
    "javascript:alert(1)",
    "//example.com/song.mp3",
    # ports
    "http://example.com:22/song.mp3",
    "http://example.com:8080/song.mp3",
    "https://example.com:0/song.mp3",
    "http://example.com:65536/song.mp3",
    "http://example.com:99999999999/",
    "http://example.com:-1/",
    # credentials
    "http://user:pass@example.com/song.mp3",
    "http://user@example.com/song.mp3",
    "http://example.com@127.0.0.1/",
    "https://example.com:443@169.254.169.254/",
    # numbers in disguise
    "http://2130706433/",
    "http://0x7f.1/",
    "http://017700000001/",
    "http://0177.0.0.1/",
    "http://127.000.000.001/",
    "http://127.1/",
    "http://0/",
    "http://1.2.3.4.5/",
    "http://%31%32%37.0.0.1/",
    # plain private, reserved and special addresses
    "http://127.0.0.1/",
    "HTTP://127.0.0.1/song.mp3",
    "http://0.0.0.0/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://198.18.0.1/",
    "http://192.0.2.1/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    # IPv6
    "http://[::1]/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[fd00:ec2::254]/",
    "http://[fc00::1]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fec0::1]/",
    "http://[ff02::1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[2002:7f00:1::1]/",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
    "http://[2001:db8::1]/",
    "http://[1:2:3]/",
    "http://[::1/",
    # local names, empty and malformed hosts
    "http://localhost/",
    "http://localhost./",
    "http://LOCALHOST:80/",
    "http://media.localhost/",
    "http://printer.local/",
    "http://metadata.google.internal/",
    "http://intranet/",
    "http:///song.mp3",
    "http://:80/",
    "http://a..b.com/",
    "",
    # injection and size
    "http://example.com/" + "a" * 3000,
    "http://example.com/song.mp3\r\nHost: 127.0.0.1",
    "http://example.com/a%0d%0a\nX: y",
    "http://exa mple.com/song.mp3",
    "http://example.com\t/song.mp3",
    "http://example.com\\@127.0.0.1/",
]

# IPv6 addresses that carry an IPv4 address, and the words the refusal names them by.
EMBEDDED_V4 = [
    ("::ffff:127.0.0.1", "IPv4-mapped"),
    ("::ffff:7f00:1", "IPv4-mapped"),
    ("::ffff:8.8.8.8", "IPv4-mapped"),
    ("::ffff:0:7f00:1", "IPv4-translated"),       # SIIT: 127.0.0.1
    ("::ffff:0:a9fe:a9fe", "IPv4-translated"),    # SIIT: 169.254.169.254
    ("::ffff:0:808:808", "IPv4-translated"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("::a9fe:a9fe", "IPv4-compatible"),
    ("::8.8.8.8", "IPv4-compatible"),
    ("64:ff9b::7f00:1", "NAT64"),
    ("64:ff9b::a9fe:a9fe", "NAT64"),
    ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"),
    ("64:ff9b:1:ffff::808:808", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4"),
    ("2002:a9fe:a9fe::", "6to4"),
    ("2002:808:808::1", "6to4"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2001:0:7f00:1::", "Teredo"),
    ("2001:0:808:808:0:f227:80ff:fefe", "Teredo"),
]
HOSTILE_URLS += [f"http://[{address}]/a.mp3" for address, _ in EMBEDDED_V4]


@pytest.fixture
async def no_network(monkeypatch):
    """Fail the test if anything looks up a name or opens a connection."""
    loop = asyncio.get_running_loop()
    touched: list[str] = []

    async def refuse(*args, **kwargs):
        touched.append(repr(args[:2]))
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(loop, "getaddrinfo", refuse)
    monkeypatch.setattr(loop, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(*a))
    return touched


@pytest.mark.parametrize("url", HOSTILE_URLS, ids=lambda u: repr(u)[:60])
async def test_hostile_link_is_refused_at_once(url, tmp_path, no_network):
    dest = tmp_path / "in" / "song"
    started = time.monotonic()
    with pytest.raises(LinkNotAllowedError) as caught:
        await download(url, dest, 10 * MB)
    assert time.monotonic() - started < 0.5
    assert caught.value.kind == "link_not_allowed"
    assert caught.value.reason and "\n" not in caught.value.reason and len(caught.value.reason) < 120
    assert no_network == []
    assert not any((tmp_path / "in").iterdir())


@pytest.mark.parametrize("url,host,port", [
    ("https://cdn.discordapp.com/attachments/1/2/song.mp3?ex=6&is=7", "cdn.discordapp.com", 443),
    ("http://Example.COM./a%20b.mp3", "example.com", 80),
    ("http://example.com:443/x", "example.com", 443),
    ("https://example.com:80/x", "example.com", 80),
    ("https://bücher.example/lied.mp3", "xn--bcher-kva.example", 443),
    ("http://[2606:4700:4700::1111]/x", "2606:4700:4700::1111", 80),
    ("http://[2606:4700:4700:0:0:0:0:1111]:443/x", "2606:4700:4700::1111", 443),
    ("http://8.8.8.8/x#fragment", "8.8.8.8", 80),
])
def test_good_links_pass_and_are_normalised(url, host, port):
    target = check_url(url)
    assert (target.host, target.port) == (host, port)
    assert target.url.isascii() and "#" not in target.url and "@" not in target.url


def test_path_is_percent_encoded_not_rewritten():
    assert check_url("https://example.com/Mÿ_Song.mp3?x=ä&y=%20").url == (
        "https://example.com/M%C3%BF_Song.mp3?x=%C3%A4&y=%20")


# -- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.31.255.255", "192.168.0.1", "169.254.169.254",
    "100.64.0.1", "100.127.255.255", "0.0.0.0", "0.1.2.3", "224.0.0.251", "239.255.255.250", "240.0.0.1",
    "255.255.255.255", "198.18.0.1", "198.19.255.255", "192.0.2.10", "198.51.100.1", "203.0.113.9",
    "192.0.0.8", "::1", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "fc00::1", "fdff::1",
    "fe80::1", "febf::1", "fec0::1", "ff02::1", "ff0e::1", "64:ff9b::a00:1", "64:ff9b:1::1",
    "2002:a00:1::1", "2002:7f00:1::", "2001::1", "2001:db8::1", "100::1", "3fff::1",
])
def test_non_public_addresses_are_refused(address):
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "162.159.128.233", "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "64:ff9b::808:808",  # what DNS64 answers for an IPv4-only site on an IPv6-only host
])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address,words", EMBEDDED_V4)
def test_ipv6_carrying_ipv4_is_refused_by_name(address, words):
    """As a link's host and as any one DNS answer, with a reason that says what it is."""
    with pytest.raises(LinkNotAllowedError, match=f"IPv6 address carrying .*\\({words}\\)"):
        check_url(f"http://[{address}]/a.mp3")
    with pytest.raises(LinkNotAllowedError, match=f"IPv6 address carrying .*\\({words}\\)"):
        vet_addresses(_info("93.184.216.34", address))
    # Not even when every IPv4 address is allowed: an IPv4 network never holds an IPv6 form.
    every_v4 = FetchRules.for_links(["0.0.0.0/0"])
    with pytest.raises(LinkNotAllowedError, match=f"\\({words}\\)"):
        check_url(f"http://[{address}]/a.mp3", every_v4)
    with pytest.raises(LinkNotAllowedError, match=f"\\({words}\\)"):
        vet_addresses(_info(address), every_v4)


def _info(*addresses: str) -> list[tuple]:
    result = []
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%")[0])
        if ip.version == 4:
            result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (text, 443)))
        else:
            result.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (text, 443, 0, 2 if "%" in text else 0)))
    return result


def test_vetting_keeps_distinct_public_answers():
    assert vet_addresses(_info("93.184.216.34", "93.184.216.34", "2606:2800:220:1::1")) == [
        (socket.AF_INET, "93.184.216.34"), (socket.AF_INET6, "2606:2800:220:1::1")]


@pytest.mark.parametrize("answers", [
    ("93.184.216.34", "10.0.0.1"),               # one private answer among public ones
    ("10.0.0.1", "93.184.216.34"),
    ("2606:2800:220:1::1", "::1"),
    ("93.184.216.34", "::ffff:169.254.169.254"),
    ("93.184.216.34", "fe80::1%2"),
    ("127.0.0.1",),
])
def test_any_non_public_answer_refuses_the_name(answers):
    with pytest.raises(LinkNotAllowedError):
        vet_addresses(_info(*answers))


def test_vetting_refuses_empty_and_odd_answers():
    with pytest.raises(UnreachableError):
        vet_addresses([])
    with pytest.raises(LinkNotAllowedError):
        vet_addresses([(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", "/run/docker.sock")])


def test_allowed_networks_open_only_what_they_cover():
    assert vet_addresses(_info("127.0.0.2"), LOOPBACK) == [(socket.AF_INET, "127.0.0.2")]
    for other in ("10.0.0.1", "169.254.169.254", "::1", "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1",
                  "2002:7f00:1::1", "192.168.1.1"):
        with pytest.raises(LinkNotAllowedError):
            vet_addresses(_info(other), LOOPBACK)
    with pytest.raises(LinkNotAllowedError, match="private"):  # one answer outside refuses the name
        vet_addresses(_info("127.0.0.1", "10.0.0.1"), LOOPBACK)
    assert vet_addresses(_info("127.0.0.1", "93.184.216.34"), LOOPBACK) == [  # public still passes beside it
        (socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "93.184.216.34")]
    with pytest.raises(LinkNotAllowedError, match="private"):
        check_url("http://10.0.0.1:8080/", LOOPBACK)
    with pytest.raises(LinkNotAllowedError, match="standard web ports"):  # other ports only inside the networks
        check_url("http://93.184.216.34:8080/", LOOPBACK)
    assert check_url("http://127.0.0.1:8080/", LOOPBACK).port == 8080
    with pytest.raises(LinkNotAllowedError, match="local network name"):  # names local to a network: never
        check_url("http://localhost:8080/", LOOPBACK)


def test_an_ipv6_form_of_ipv4_passes_only_when_an_ipv6_network_covers_it():
    mapped = ipaddress.ip_address("::ffff:127.0.0.1")
    assert address_problem(mapped, LOOPBACK) is not None
    assert address_problem(mapped, FetchRules.for_links(["::ffff:127.0.0.0/104"])) is None
    nat64 = ipaddress.ip_address("64:ff9b::7f00:1")
    assert address_problem(nat64, LOOPBACK) is not None
    assert address_problem(nat64, FetchRules.for_links(["64:ff9b::/96"])) is None


def test_no_network_is_allowed_by_default():
    assert FetchRules() == FetchRules.for_links([]) and FetchRules().allowed_networks == ()
    with pytest.raises(LinkNotAllowedError, match="loopback"):
        check_url("http://127.0.0.1/song.mp3")
    with pytest.raises(LinkNotAllowedError, match="standard web ports"):
        check_url("http://127.0.0.1:8080/song.mp3")
    with pytest.raises(LinkNotAllowedError, match="loopback"):
        vet_addresses(_info("127.0.0.1"))


@pytest.mark.parametrize("text", ["127.0.0.1/8", "10.0.0.0/33", "nas.lan", "", "192.168.1.0/24:8096", "fe80::/10%eth0"])
def test_allowed_networks_must_be_exact_cidr(text):
    with pytest.raises(ValueError, match="CIDR"):
        FetchRules.for_links([text])


# -- attachments: from the CDN origins only --------------------------------------------------


def test_attachments_come_from_discords_cdn_by_default():
    rules = FetchRules.for_attachments()
    assert [str(o) for o in rules.origins] == ["https://cdn.discordapp.com", "https://media.discordapp.net"]
    assert SourceRules().for_kind("attachment") == rules
    assert SourceRules().for_kind("url") == SourceRules().for_kind("stream") == FetchRules()
    assert Settings(_env_file=None).discord_cdn_origins == DISCORD_CDN_ORIGINS


@pytest.mark.parametrize("url", [
    "https://cdn.discordapp.com/attachments/1/2/song.mp3?ex=6&is=7&hm=8",
    "https://media.discordapp.net/attachments/1/2/My%20Song.flac",
    "HTTPS://CDN.discordapp.com:443/attachments/1/2/song.mp3",
])
def test_an_attachment_on_the_cdn_passes(url):
    target = check_url(url, FetchRules.for_attachments())
    assert target.scheme == "https" and target.port == 443


@pytest.mark.parametrize("url", [
    "https://example.com/attachments/1/2/song.mp3",           # a public site: elsewhere all the same
    "https://8.8.8.8/song.mp3",
    "http://cdn.discordapp.com/attachments/1/2/song.mp3",     # another scheme
    "https://cdn.discordapp.com:8443/attachments/song.mp3",   # another port
    "https://cdn.discordapp.com.example.com/song.mp3",
    "https://evil.example/cdn.discordapp.com/song.mp3",
    "https://discordapp.com/song.mp3",
    "http://127.0.0.1/song.mp3",
    "http://localhost/song.mp3",
])
async def test_an_attachment_anywhere_else_is_refused_at_once(url, tmp_path, no_network):
    with pytest.raises(LinkNotAllowedError) as caught:
        await download(url, tmp_path / "song", MB, rules=FetchRules.for_attachments())
    assert caught.value.reason == NOT_ON_CDN and no_network == []


@pytest.mark.parametrize("text,origin", [
    ("https://cdn.discordapp.com", Origin("https", "cdn.discordapp.com", 443)),
    ("HTTPS://Media.Discordapp.NET/", Origin("https", "media.discordapp.net", 443)),
    ("http://fakecdn:8080", Origin("http", "fakecdn", 8080)),          # a local name: the operator's own
    ("http://127.0.0.1:8080", Origin("http", "127.0.0.1", 8080)),
    ("https://[::1]:8443", Origin("https", "::1", 8443)),
    ("http://cdn.example:80", Origin("http", "cdn.example", 80)),
])
def test_origins_are_parsed_and_normalised(text, origin):
    assert parse_origin(text) == origin
    assert parse_origin(str(origin)) == origin


@pytest.mark.parametrize("text", [
    "cdn.discordapp.com", "ftp://cdn.example", "https://cdn.example/attachments", "https://cdn.example?x=1",
    "https://cdn.example#x", "https://user@cdn.example", "https://cdn.example:99999", "https://", "https://[::1",
    "https://0x7f.1", "",
])
def test_anything_but_an_origin_is_refused(text):
    with pytest.raises(ValueError, match="not an origin"):
        parse_origin(text)


def test_attachments_need_an_origin():
    with pytest.raises(ValueError, match="at least one origin"):
        FetchRules.for_attachments([])


@pytest.mark.parametrize("env,words", [
    ({"STEMBOT_DISCORD_CDN_URL": ""}, "at least one origin"),
    ({"STEMBOT_DISCORD_CDN_URL": "https://cdn.example/attachments"}, "not an origin"),
    ({"STEMBOT_DISCORD_CDN_URL": "cdn.example"}, "not an origin"),
    ({"STEMBOT_FETCH_ALLOWED_NETWORKS": "127.0.0.1/8"}, "CIDR"),
    ({"STEMBOT_FETCH_ALLOWED_NETWORKS": "nas.lan"}, "CIDR"),
])
def test_settings_refuse_bad_values_on_load(monkeypatch, env, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=words):
        Settings(_env_file=None)


def test_settings_read_lists(monkeypatch):
    monkeypatch.setenv("STEMBOT_DISCORD_CDN_URL", " http://127.0.0.1:8080 , https://cdn.example ")
    monkeypatch.setenv("STEMBOT_FETCH_ALLOWED_NETWORKS", "127.0.0.0/8, fd00::/8")
    settings = Settings(_env_file=None)
    assert settings.discord_cdn_origins == ("http://127.0.0.1:8080", "https://cdn.example")
    assert settings.fetch_allowed_network_list == ("127.0.0.0/8", "fd00::/8")
    monkeypatch.delenv("STEMBOT_DISCORD_CDN_URL")
    monkeypatch.delenv("STEMBOT_FETCH_ALLOWED_NETWORKS")
    assert Settings(_env_file=None).fetch_allowed_network_list == ()  # nothing opened by default


# -- content sniffing ------------------------------------------------------------------------


@pytest.mark.parametrize("head,what", [
    (b"<!DOCTYPE html><html><head><title>Not found</title>", "a web page"),
    (b"\n  <html lang=en>", "a web page"),
    (b"<?xml version='1.0'?><rss>", "a web page"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "an image"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "an image"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "an image"),
    (b"PK\x03\x04\x14\x00\x00\x00", "an archive"),
    (b"%PDF-1.7\n%\xe2\xe3", "a PDF document"),
    (b"\x7fELF\x02\x01\x01\x00", "a program"),
    (b"MZ\x90\x00\x03\x00", "a program"),
    (b"\x1f\x8b\x08\x00\x00\x00", "compressed data"),
    (b"#EXTM3U\n#EXTINF:10,\nhttp://10.0.0.1/a.mp3\n", "text"),
    (b"ffconcat version 1.0\nfile '/etc/passwd'\n", "text"),
    ("lyrics: la la lä\n".encode() * 20, "text"),
    (b"", "an empty file"),
])
def test_not_media_is_recognised(head, what):
    assert sniff_not_media(head) == what


@pytest.mark.parametrize("head", [
    b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\xff\xfb\x90\x64", b"\xff\xf1\x50\x80", b"fLaC\x00\x00\x00\x22",
    b"OggS\x00\x02", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"\x00\x00\x00\x20ftypM4A ", b"\x1aE\xdf\xa3\x01",
    b"FORM\x00\x00\x00\x00AIFF", b"caff\x00\x01", bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"),
    bytes(range(256)),  # unknown binary: ffprobe decides
])
def test_media_and_unknown_binary_pass(head):
    assert sniff_not_media(head) is None


# -- a real server on loopback ---------------------------------------------------------------


class Server:
    def __init__(self, song: bytes):
        self.song = song
        self.requests: list[web.Request] = []
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def app(self) -> web.Application:
        app = web.Application()
        app.middlewares.append(self._record)
        routes = {
            "/song.wav": self.serve_song, "/page": self.serve_html_as_audio, "/gzip": self.serve_gzip,
            "/declared-huge": self.serve_declared_huge, "/stream-huge": self.serve_stream_huge,
            "/slow": self.serve_slow, "/stall": self.serve_stall, "/cut": self.serve_cut,
            "/missing": self.serve_404, "/to-metadata": self.redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-private": self.redirect("http://10.0.0.1/song.wav"),
            "/to-ftp": self.redirect("ftp://example.com/song.wav"), "/to-nowhere": self.serve_redirect_without_location,
            "/to-localhost": self.redirect("http://localhost/song.wav"),
        }
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        app.router.add_get("/chain/{n}", self.serve_chain)
        app.router.add_get("/redirect", self.serve_redirect_to)
        return app

    @web.middleware
    async def _record(self, request, handler):
        self.requests.append(request)
        return await handler(request)

    async def serve_song(self, request):
        return web.Response(body=self.song, content_type="audio/wav")

    async def serve_html_as_audio(self, request):
        return web.Response(body=b"<!DOCTYPE html><html><body>Please log in</body></html>" * 10,
                            content_type="audio/mpeg")

    async def serve_gzip(self, request):
        return web.Response(body=gzip.compress(self.song), content_type="audio/wav",
                            headers={"Content-Encoding": "gzip"})

    async def serve_declared_huge(self, request):
        response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        response.content_length = 50 * MB
        await response.prepare(request)
        await response.write(b"ID3" + b"\x00" * 65533)
        await asyncio.sleep(30)  # never finishes: refusing must not wait for the body
        return response

    async def serve_stream_huge(self, request):
        response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        response.enable_chunked_encoding()  # no Content-Length: the cap is counted
        await response.prepare(request)
        await response.write(b"ID3" + b"\x00" * 65533)
        for _ in range(100):
            await response.write(b"\xff\xfb\x90\x64" * 16384)
        return response

    async def serve_slow(self, request):
        await asyncio.sleep(30)
        return web.Response(body=self.song)

    async def serve_stall(self, request):
        response = web.StreamResponse()
        response.content_length = len(self.song)
        await response.prepare(request)
        await response.write(self.song[:1000])
        await asyncio.sleep(30)
        return response

    async def serve_cut(self, request):
        response = web.StreamResponse()
        response.content_length = len(self.song)
        await response.prepare(request)
        await response.write(self.song[:5000])
        request.transport.close()
        return response

    async def serve_404(self, request):
        return web.Response(status=404, text="not here")

    async def serve_redirect_without_location(self, request):
        return web.Response(status=302)

    def redirect(self, location):
        async def handler(request):
            raise web.HTTPFound(location)
        return handler

    async def serve_redirect_to(self, request):
        raise web.HTTPFound(request.query["to"])

    async def serve_chain(self, request):
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/chain/{n - 1}" if n > 1 else "/song.wav")


@pytest.fixture(scope="module")
def song_bytes(tmp_path_factory) -> bytes:
    return music(tmp_path_factory.mktemp("song") / "song.wav", seconds=1.5, extra=("-c:a", "pcm_s16le")).read_bytes()


@pytest.fixture
async def server(song_bytes):
    state = Server(song_bytes)
    runner = web.AppRunner(state.app(), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = site._server.sockets[0].getsockname()[1]
    yield state
    await runner.cleanup()


async def fetch_to(tmp_path, url, max_bytes=10 * MB, **kwargs):
    dest = tmp_path / "in" / "song"
    try:
        return await download(url, dest, max_bytes, rules=LOOPBACK, **kwargs), dest
    finally:
        # Whatever happened, nothing half-written stays behind.
        assert not list((tmp_path / "in").glob("*.part"))


async def test_downloads_the_exact_bytes(server, tmp_path, song_bytes):
    size, dest = await fetch_to(tmp_path, server.url("/song.wav"))
    assert size == len(song_bytes) and dest.read_bytes() == song_bytes
    sent = server.requests[0].headers
    assert sent["Accept-Encoding"] == "identity" and sent["Host"] == f"127.0.0.1:{server.port}"
    assert "Cookie" not in sent and "Authorization" not in sent


async def test_redirect_chain_of_three_is_followed(server, tmp_path, song_bytes):
    size, dest = await fetch_to(tmp_path, server.url("/chain/3"))
    assert dest.read_bytes() == song_bytes
    assert [r.path for r in server.requests] == ["/chain/3", "/chain/2", "/chain/1", "/song.wav"]


@pytest.mark.parametrize("path,kind,words", [
    ("/chain/4", "unreachable", "redirects more than 3"),
    ("/to-metadata", "link_not_allowed", "private"),
    ("/to-private", "link_not_allowed", "private"),
    ("/to-localhost", "link_not_allowed", "local network name"),
    ("/to-ftp", "link_not_allowed", "only http and https"),
    ("/to-nowhere", "unreachable", "HTTP 302"),
    ("/missing", "unreachable", "HTTP 404"),
    ("/page", "not_audio", "a web page"),
    ("/gzip", "not_audio", "compressed"),
    ("/cut", "unreachable", "cut off"),
])
async def test_refusals(server, tmp_path, path, kind, words):
    with pytest.raises(InputError) as caught:
        await fetch_to(tmp_path, server.url(path))
    assert caught.value.kind == kind and words in caught.value.reason
    assert not (tmp_path / "in" / "song").exists()
    if path == "/chain/4":
        assert len(server.requests) == 4  # the fourth redirect is not followed


async def test_declared_size_over_the_cap_is_refused_before_reading(server, tmp_path):
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        await fetch_to(tmp_path, server.url("/declared-huge"), max_bytes=1 * MB)
    assert caught.value.kind == "too_large" and "50 MB" in caught.value.reason
    assert time.monotonic() - started < 2


async def test_streamed_size_over_the_cap_is_refused(server, tmp_path):
    with pytest.raises(InputError) as caught:
        await fetch_to(tmp_path, server.url("/stream-huge"), max_bytes=1 * MB)
    assert caught.value.kind == "too_large"
    assert not (tmp_path / "in" / "song").exists()


@pytest.mark.parametrize("path,options", [
    ("/slow", {"timeout_s": 1.0}),
    ("/stall", {"read_timeout_s": 0.5}),
])
async def test_slow_servers_time_out(server, tmp_path, path, options):
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        await fetch_to(tmp_path, server.url(path), **options)
    assert caught.value.kind == "timed_out"
    assert time.monotonic() - started < 3


async def test_unreachable_port(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(InputError) as caught:
        await fetch_to(tmp_path, f"http://127.0.0.1:{port}/song.wav")
    assert caught.value.kind == "unreachable"


# -- attachments from a CDN origin on loopback (a self-hosted Discord-compatible server) -------


async def fetch_attachment(tmp_path, server, path, max_bytes=10 * MB):
    cdn = FetchRules.for_attachments([f"http://127.0.0.1:{server.port}"])
    return await download(server.url(path), tmp_path / "in" / "song", max_bytes, rules=cdn)


async def test_the_configured_origin_is_fetched_even_on_loopback(server, tmp_path, song_bytes):
    assert await fetch_attachment(tmp_path, server, "/song.wav") == len(song_bytes)
    assert await fetch_attachment(tmp_path, server, "/chain/2") == len(song_bytes)  # redirects on the origin
    assert [r.path for r in server.requests] == ["/song.wav", "/chain/2", "/chain/1", "/song.wav"]


@pytest.mark.parametrize("path", [
    "/to-private", "/to-metadata", "/to-localhost", "/to-ftp",
    "/redirect?to=http://localhost:{port}/song.wav",          # the same server under another name
    "/redirect?to=http://127.0.0.2:{port}/song.wav",          # another loopback address
    "/redirect?to=https://example.com/song.wav",              # a public site
])
async def test_a_redirect_may_not_leave_the_origin(server, tmp_path, path):
    with pytest.raises(LinkNotAllowedError) as caught:
        await fetch_attachment(tmp_path, server, path.format(port=server.port))
    assert caught.value.reason == OFF_CDN_REDIRECT
    assert len(server.requests) == 1 and not (tmp_path / "in" / "song").exists()


@pytest.mark.parametrize("path,kind", [("/page", "not_audio"), ("/gzip", "not_audio"), ("/stream-huge", "too_large"),
                                       ("/missing", "unreachable")])
async def test_the_cdn_gets_every_other_check(server, tmp_path, path, kind):
    with pytest.raises(InputError) as caught:
        await fetch_attachment(tmp_path, server, path, max_bytes=1 * MB)
    assert caught.value.kind == kind and not (tmp_path / "in" / "song").exists()


async def test_an_attachment_on_another_origin_is_refused_though_it_serves_the_song(server, tmp_path):
    other = FetchRules.for_attachments([f"http://127.0.0.1:{server.port + 1}"])
    with pytest.raises(LinkNotAllowedError, match="only fetched from Discord's CDN"):
        await download(server.url("/song.wav"), tmp_path / "song", MB, rules=other)
    assert server.requests == []


# -- DNS: the answer is vetted, and the connection is pinned to it -----------------------------


@pytest.fixture
async def fake_dns(monkeypatch):
    """`loop.getaddrinfo` with a table for *.test names; the DNS layer, not the code under test."""
    loop = asyncio.get_running_loop()
    table: dict[str, list[list[str]]] = {}
    asked: list[str] = []
    real = loop.getaddrinfo

    async def getaddrinfo(host, port, *args, **kwargs):
        if not str(host).endswith(".test"):
            return await real(host, port, *args, **kwargs)
        asked.append(host)
        answers = table[host]
        # Each lookup gets the next answer; the last one repeats (a rebinding name).
        return _info_for_port(answers[min(asked.count(host), len(answers)) - 1], port)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return table, asked


def _info_for_port(addresses, port):
    return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
             (a, port) if ":" not in a else (a, port, 0, 0)) for a in addresses]


async def test_connection_is_pinned_to_the_vetted_address(server, tmp_path, song_bytes, fake_dns):
    table, asked = fake_dns
    # First answer loopback (an allowed network), then a private address: if anything
    # looked the name up again to connect, the download would go there and fail.
    table["media.test"] = [["127.0.0.1"], ["10.255.255.1"]]
    size, dest = await fetch_to(tmp_path, f"http://media.test:{server.port}/song.wav", connect_timeout_s=2)
    assert dest.read_bytes() == song_bytes
    assert asked == ["media.test"]
    assert server.requests[0].headers["Host"] == f"media.test:{server.port}"


async def test_each_redirect_hop_is_resolved_and_vetted_again(server, tmp_path, song_bytes, fake_dns):
    table, asked = fake_dns
    table["good.test"] = [["127.0.0.1"]]
    table["rebind.test"] = [["10.0.0.7"]]
    size, dest = await fetch_to(tmp_path, server.url(f"/redirect?to=http://good.test:{server.port}/song.wav"))
    assert dest.read_bytes() == song_bytes and asked == ["good.test"]
    with pytest.raises(LinkNotAllowedError, match="private"):
        await fetch_to(tmp_path, server.url(f"/redirect?to=http://rebind.test:{server.port}/song.wav"))
    assert asked == ["good.test", "rebind.test"]


async def test_a_name_with_one_private_answer_is_refused_without_connecting(tmp_path, fake_dns, monkeypatch):
    table, asked = fake_dns
    table["mixed.test"] = [["93.184.216.34", "169.254.169.254"]]
    loop = asyncio.get_running_loop()
    connects = []

    async def no_connect(*args, **kwargs):
        connects.append(args)
        raise AssertionError("connected")

    monkeypatch.setattr(loop, "create_connection", no_connect)
    with pytest.raises(LinkNotAllowedError, match="private"):
        await download("https://mixed.test/song.mp3", tmp_path / "song", MB, rules=LOOPBACK)
    assert asked == ["mixed.test"] and connects == []


async def test_a_named_cdn_origin_is_not_held_to_the_public_rule(server, tmp_path, song_bytes, fake_dns):
    table, asked = fake_dns
    table["cdn.test"] = [["127.0.0.1"]]
    cdn = FetchRules.for_attachments([f"http://cdn.test:{server.port}"])
    assert await download(f"http://cdn.test:{server.port}/song.wav", tmp_path / "song", MB, rules=cdn) == len(
        song_bytes)
    assert server.requests[0].headers["Host"] == f"cdn.test:{server.port}"
    with pytest.raises(LinkNotAllowedError, match="loopback"):  # the same name as a link: public rule
        await download("http://cdn.test/song.wav", tmp_path / "song2", MB)


async def test_a_name_on_another_port_must_resolve_inside_the_allowed_networks(server, tmp_path, fake_dns,
                                                                                 monkeypatch):
    table, asked = fake_dns
    table["public.test"] = [["93.184.216.34"]]
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "create_connection", lambda *a, **k: pytest.fail("connected"))
    with pytest.raises(LinkNotAllowedError, match="standard web ports"):
        await download(f"http://public.test:{server.port}/song.wav", tmp_path / "song", MB, rules=LOOPBACK)
    assert asked == ["public.test"]


async def test_a_name_that_does_not_resolve_is_unreachable(tmp_path, monkeypatch):
    loop = asyncio.get_running_loop()

    async def nxdomain(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", nxdomain)
    with pytest.raises(UnreachableError, match="could not be found"):
        await download("https://no-such-name.example/song.mp3", tmp_path / "song", MB)
