"""Fetching a user's link or a Discord attachment URL without letting it reach inside our network.

Each hop (the link, then each redirect, at most `MAX_REDIRECTS`) is checked before any
connection: http or https, port 80 or 443, no credentials, and a host that is a plain
name or a canonical address, never a number in disguise (`2130706433`, `0x7f.1`, `127.1`).
The name is then resolved here and refused if ANY answer is not a public address, and the
connection is pinned to the vetted addresses (a resolver that knows nothing else), so a
DNS answer that changes between the check and the connect cannot win. TLS SNI and the
Host header still carry the original name.

IPv6 addresses that carry an IPv4 address are refused by their prefix, whatever IPv4
address they carry: IPv4-mapped `::ffff:0:0/96`, IPv4-translated `::ffff:0:0:0/96` (SIIT),
IPv4-compatible `::/96`, local-use NAT64 `64:ff9b:1::/48`, 6to4 `2002::/16` and Teredo
`2001::/32`. A public site is never reachable only through one of them (6to4 and Teredo
are relay tunnels for clients, and the mapped forms are how a socket API writes IPv4, not
a DNS answer), while each is a way to reach an IPv4 address that a gateway, a dual-stack
socket or SIIT translates behind our back, and the local-use NAT64 prefix does not even
say where in it the IPv4 address sits. The well-known NAT64 prefix `64:ff9b::/96` is the
one exception: on an IPv6-only host, DNS64 answers with it for every IPv4-only site, so
refusing it outright would break such a bot. There the IPv4 address sits at a fixed place
(its last 32 bits, RFC 6052), and the address is refused when that IPv4 address is not
public.

Nothing from the server is trusted: no decompression (`Accept-Encoding: identity`, and a
compressed answer is refused), sizes are counted while streaming, and the first bytes
must not look like a web page, text, an image, an archive or a program. Anything else
is left to ffprobe, which runs with its own allowlist.

Two sets of rules (`FetchRules`), chosen by what is fetched, never by who runs the code:
- A member's link (`FetchRules.for_links`, the default): the public rule above. The operator
  may name networks it trusts (`STEMBOT_FETCH_ALLOWED_NETWORKS`, CIDR, none by default),
  such as an intranet media server: an address inside one passes the address rule, on any
  port. Every DNS answer must still be public OR inside an allowed network; an IPv6 form
  that carries an IPv4 address is inside only an IPv6 network that covers it (never
  `127.0.0.0/8`); and names that only mean something inside a network (`nas.lan`,
  `localhost`, one label) are still refused before any lookup: such a link names the
  address, or a name in DNS.
- A Discord attachment (`FetchRules.for_attachments`): only a URL whose scheme, host and
  port are exactly one of the configured origins (`STEMBOT_DISCORD_CDN_URL`, Discord's CDN
  by default), and a redirect must stay on them too. Those names are the operator's, so
  their addresses are not held to the public rule (a self-hosted Discord-compatible server
  may be on the operator's network); they are still pinned, and every other check holds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from core.errors import LinkNotAllowedError, NotAudioError, TimedOutError, TooLargeError, UnreachableError

log = logging.getLogger(__name__)

# Kept for callers written against the first version of this module.
FetchError = UnreachableError

MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 3
ALLOWED_SCHEMES = ("http", "https")
ALLOWED_PORTS = (80, 443)
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DNS_TIMEOUT_S = 10.0
CHUNK = 1 << 16
SNIFF_BYTES = 4096
USER_AGENT = "stembot (audio fetcher)"
STANDARD_PORTS = "only links on the standard web ports (80 and 443) are allowed"
NOT_ON_CDN = "attachments are only fetched from Discord's CDN, and this file is elsewhere"
OFF_CDN_REDIRECT = "the attachment's server redirected away from Discord's CDN"

# Where Discord serves attachments (the default of STEMBOT_DISCORD_CDN_URL).
DISCORD_CDN_ORIGINS = ("https://cdn.discordapp.com", "https://media.discordapp.net")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
# `is_global` already covers most of these; they are listed because its tables differ
# between Python versions (3.11 calls fec0::/10 and ::ffff:8.8.8.8 global).
_FORBIDDEN_V4 = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",  # 240/4 holds 255.255.255.255
))
_FORBIDDEN_V6 = tuple(ipaddress.ip_network(n) for n in (
    "100::/64",         # discard
    "2001::/23",        # IETF protocol assignments: ORCHID, benchmarking, ... (Teredo is named below)
    "2001:db8::/32",    # documentation
    "3fff::/20",        # documentation
    "5f00::/16",        # SRv6 SIDs
    "fc00::/7",         # unique local
    "fe80::/10",        # link-local
    "fec0::/10",        # site-local (deprecated)
    "ff00::/8",         # multicast
))
# IPv6 ranges that carry an IPv4 address, refused whatever that address is (see the
# module docstring); checked after `::` and `::1`, which `::/96` holds too.
_CARRIES_V4 = tuple((ipaddress.ip_network(n), kind) for n, kind in (
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::ffff:0:0:0/96", "IPv4-translated"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("2002::/16", "6to4"),
    ("2001::/32", "Teredo"),
))
# Judged by the IPv4 address in its last 32 bits: DNS64 answers with it on IPv6-only hosts.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Names that only mean something inside a network; refused before any lookup.
_LOCAL_SUFFIXES = ("localhost", "localdomain", "local", "internal", "lan", "home.arpa")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# A last label that is a number makes the WHATWG URL parser read the host as an IPv4 address.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
# What may stay unescaped in a path or query; everything else is percent-encoded.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


@dataclass(frozen=True)
class Target:
    """A link that passed `check_url`: what to request and where."""

    url: str                 # ASCII, normalised, without fragment or credentials
    scheme: str
    host: str                # lower-case ASCII name, or an address without brackets
    port: int
    address: IPAddress | None = None  # set when the host is an address literal


@dataclass(frozen=True)
class Origin:
    """Where a URL points: its scheme, host (as `check_url` normalises it) and port."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{netloc}" + ("" if self.port == DEFAULT_PORTS[self.scheme] else f":{self.port}")


@dataclass(frozen=True)
class FetchRules:
    """Where a download may go (see the module docstring).

    With `origins` (attachments): only those origins, at whatever address their names
    have. Without (links): public addresses on ports 80 and 443, and any address inside
    `allowed_networks` on any port. `FetchRules()` is the strictest: public sites only.
    """

    allowed_networks: tuple[IPNetwork, ...] = ()
    origins: tuple[Origin, ...] = ()

    @classmethod
    def for_links(cls, allowed_networks: Iterable[str] = ()) -> FetchRules:
        """Links from members; `allowed_networks` in CIDR form. ValueError if one is not."""
        return cls(allowed_networks=tuple(parse_network(n) for n in allowed_networks))

    @classmethod
    def for_attachments(cls, origins: Iterable[str] = DISCORD_CDN_ORIGINS) -> FetchRules:
        """Discord attachments, from `origins` (`scheme://host[:port]`). ValueError if one is not."""
        parsed = tuple(parse_origin(o) for o in origins)
        if not parsed:
            raise ValueError("attachments need at least one origin to be fetched from")
        return cls(origins=parsed)

    def allows(self, ip: IPAddress) -> bool:
        """Whether `ip` is inside a network the operator allowed (an IPv4 network never
        holds an IPv6 address, whatever IPv4 address it carries)."""
        return any(ip in net for net in self.allowed_networks)


@dataclass(frozen=True)
class SourceRules:
    """The rules for each kind of job input."""

    links: FetchRules = FetchRules()
    attachments: FetchRules = field(default_factory=FetchRules.for_attachments)

    def for_kind(self, source_kind: str) -> FetchRules:
        """The rules for a job's `source_kind`: "attachment", or a link ("url", "stream")."""
        return self.attachments if source_kind == "attachment" else self.links


def parse_network(text: str) -> IPNetwork:
    """A network in CIDR form (`192.168.1.0/24`, `fd00::/8`); ValueError otherwise."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        raise ValueError(f"{text!r} is not a network in CIDR form, such as 192.168.1.0/24") from None


def parse_origin(text: str) -> Origin:
    """`scheme://host[:port]` (http or https, nothing after the host) as an Origin; ValueError otherwise."""
    problem = f"{text!r} is not an origin such as https://cdn.example.com or http://10.0.0.5:8080"
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise ValueError(problem) from None
    scheme = parts.scheme.lower()
    if (scheme not in ALLOWED_SCHEMES or not parts.hostname or "@" in parts.netloc
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(problem)
    try:
        host, _address = _check_host(parts.hostname, bracketed="[" in parts.netloc, local_names=True)
    except LinkNotAllowedError as exc:
        raise ValueError(f"{problem}: {exc.reason}") from None
    return Origin(scheme, host, DEFAULT_PORTS[scheme] if port is None else port)


# -- addresses -----------------------------------------------------------------------------


def address_problem(ip: IPAddress, rules: FetchRules = FetchRules()) -> str | None:
    """Why a link must not connect to `ip`, or None when it is a public address or one
    inside the rules' allowed networks."""
    if rules.allows(ip):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id or ip.is_unspecified or ip.is_loopback:
            return "a private or reserved network address"
        for net, kind in _CARRIES_V4:
            if ip in net:
                return f"an IPv6 address carrying an IPv4 address ({kind})"
        if ip in _NAT64:  # judged by its IPv4 address alone, whatever Python's tables say of the prefix
            # Held to the public rule: an allowed IPv4 network does not open its NAT64 form.
            if address_problem(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)):
                return "an IPv6 address carrying a non-public IPv4 address (NAT64)"
            return None
        if any(ip in net for net in _FORBIDDEN_V6) or not ip.is_global:
            return "a private or reserved network address"
        return None
    if ip in _LOOPBACK_V4:
        return "this machine (a loopback address)"
    if any(ip in net for net in _FORBIDDEN_V4) or not ip.is_global:
        return "a private or reserved network address"
    return None


def vet_addresses(infos: Iterable[tuple], rules: FetchRules = FetchRules()) -> list[tuple[int, str]]:
    """The distinct (family, address) pairs of `getaddrinfo` results.

    For a link, raises LinkNotAllowedError if ANY of them is neither public nor inside an
    allowed network: a name that answers with one public and one private address could be
    steered to the private one. For an attachment origin (a name the operator configured)
    any internet address passes.
    """
    found: list[tuple[int, str]] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise LinkNotAllowedError("the link's host resolves to something that is not an internet address")
        try:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        except ValueError:
            raise LinkNotAllowedError("the link's host resolves to an address that is not valid") from None
        if isinstance(sockaddr, tuple) and len(sockaddr) >= 4 and sockaddr[3]:
            raise LinkNotAllowedError("the link points to a link-local network address")
        problem = None if rules.origins else address_problem(ip, rules)
        if problem:
            raise LinkNotAllowedError(f"the link points to {problem}")
        pair = (family, str(ip))
        if pair not in found:
            found.append(pair)
    if not found:
        raise UnreachableError("the link's host name has no address")
    return found


# -- links ---------------------------------------------------------------------------------


def check_url(url: str, rules: FetchRules = FetchRules()) -> Target:
    """Parse and check `url` against `rules` without any network access; raises LinkNotAllowedError."""
    if not isinstance(url, str) or not url:
        raise LinkNotAllowedError("the link is empty")
    if len(url) > MAX_URL_LENGTH:
        raise LinkNotAllowedError(f"the link is longer than {MAX_URL_LENGTH} characters")
    # Spaces and control characters (CR/LF injection) and backslashes (which browsers
    # read as slashes, so parsers disagree on where the host ends) are refused outright.
    if any(ord(c) <= 0x20 or c in "\x7f\\" for c in url):
        raise LinkNotAllowedError("the link contains spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise LinkNotAllowedError("the link is not a valid web address") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise LinkNotAllowedError("only http and https links are allowed")
    if "@" in parts.netloc:
        raise LinkNotAllowedError("links with a user name or password are not allowed")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise LinkNotAllowedError("the link has no host name")
    if port is None:
        port = DEFAULT_PORTS[scheme]
    if rules.origins:
        host, address = _check_host(raw_host, bracketed="[" in parts.netloc, local_names=True)
        if Origin(scheme, host, port) not in rules.origins:
            raise LinkNotAllowedError(NOT_ON_CDN)
    else:
        # Another port only on an allowed network (checked again once the name is resolved).
        if port not in ALLOWED_PORTS and not rules.allowed_networks:
            raise LinkNotAllowedError(STANDARD_PORTS)
        host, address = _check_host(raw_host, bracketed="[" in parts.netloc)
        if address is not None:
            problem = address_problem(address, rules)
            if problem:
                raise LinkNotAllowedError(f"the link points to {problem}")
            if port not in ALLOWED_PORTS and not rules.allows(address):
                raise LinkNotAllowedError(STANDARD_PORTS)

    netloc = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
    if port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    query = quote(parts.query, safe=_QUERY_SAFE)
    normal = f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")
    # Belt and braces: the HTTP client must read the same host and port as we did.
    parsed = URL(normal, encoded=True)
    if parsed.raw_host != host or parsed.port != port:
        raise LinkNotAllowedError("the link is not a valid web address")
    return Target(normal, scheme, host, port, address)


def _check_host(raw_host: str, bracketed: bool, local_names: bool = False) -> tuple[str, IPAddress | None]:
    """The host as ASCII and, for an address literal, the address. A name that only means
    something inside a network is refused unless `local_names`."""
    if "%" in raw_host:  # IPv6 zone ids and percent-escapes in names
        raise LinkNotAllowedError("the link's host name is not valid")
    if bracketed:
        try:
            address = ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise LinkNotAllowedError("the link's host address is not valid") from None
        return str(address), address  # compressed, as the HTTP client writes it
    host = raw_host[:-1] if raw_host.endswith(".") else raw_host
    try:
        # Only canonical dotted decimal parses here (leading zeros are refused).
        return host, ipaddress.IPv4Address(host)
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
    except OSError:
        pass
    else:  # octal, hex, or shortened forms that some resolvers read as addresses
        raise LinkNotAllowedError("the link uses an unusual form of network address")
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise LinkNotAllowedError("the link's host name is not valid") from None
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise LinkNotAllowedError("the link's host name is not valid")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise LinkNotAllowedError("the link uses an unusual form of network address")
    if not local_names and (len(labels) < 2 or any(host == s or host.endswith("." + s) for s in _LOCAL_SUFFIXES)):
        raise LinkNotAllowedError("the link points to a local network name, not a public site")
    return host, None


async def resolve_target(target: Target, rules: FetchRules = FetchRules()) -> list[tuple[int, str]]:
    """The vetted addresses for `target`: its literal, or every DNS answer, each passing `rules`."""
    if target.address is not None:
        return _vet_target(target, [], rules)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(DNS_TIMEOUT_S):
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM,
                                           proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        raise UnreachableError(f"the site {target.host} could not be found") from None
    except TimeoutError:
        raise TimedOutError(f"looking up {target.host} took too long") from None
    return _vet_target(target, infos, rules)


def resolve_target_blocking(target: Target, rules: FetchRules = FetchRules()) -> list[tuple[int, str]]:
    """`resolve_target` for code that runs in a thread (yt-dlp)."""
    if target.address is not None:
        return _vet_target(target, [], rules)
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        raise UnreachableError(f"the site {target.host} could not be found") from None
    return _vet_target(target, infos, rules)


def _vet_target(target: Target, infos: list[tuple], rules: FetchRules) -> list[tuple[int, str]]:
    if target.address is not None:
        family = socket.AF_INET6 if target.address.version == 6 else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(target.address), target.port))]
    addresses = vet_addresses(infos, rules)
    # A link on another port got past check_url only for an allowed network: every answer must be inside one.
    if not rules.origins and target.port not in ALLOWED_PORTS and not all(
            rules.allows(ipaddress.ip_address(a)) for _, a in addresses):
        raise LinkNotAllowedError(STANDARD_PORTS)
    return addresses


class PinnedResolver(AbstractResolver):
    """A resolver for aiohttp that knows one host and answers with its vetted addresses."""

    def __init__(self, host: str, addresses: list[tuple[int, str]]):
        self.host = host
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[ResolveResult]:
        if host.rstrip(".").lower() != self.host:
            raise OSError(f"refusing to resolve {host!r}: it was not vetted")
        answers = [
            ResolveResult(hostname=host, host=address, port=port, family=fam, proto=socket.IPPROTO_TCP,
                          flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
            for fam, address in self.addresses if family in (socket.AF_UNSPEC, fam)
        ]
        if not answers:
            raise OSError(f"no vetted address of family {family} for {host!r}")
        return answers

    async def close(self) -> None:
        pass


# -- content -------------------------------------------------------------------------------


def _media_magic(head: bytes) -> bool:
    """The first bytes of a known audio or video container."""
    if head[:3] == b"ID3" or head[:4] in (b"fLaC", b"OggS", b"caff", b"wvpk", b"MAC ", b".snd", b"TTA1",
                                          b"MPCK", b"FLV\x01", b"DSD ", b"\x1aE\xdf\xa3", b"RF64", b"BW64"):
        return True
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI ", b"RMID"):
        return True
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return True
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):  # mp4, m4a, mov, 3gp
        return True
    if head[:16] == bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"):  # asf: wma, wmv
        return True
    if head[:5] == b"#!AMR" or head[:3] == b"MP+" or head[:19] == b"Creative Voice File":
        return True
    if head[:4] == b"\x00\x00\x01\xba" or head[:2] in (b"\x0bw", b"\x7f\xfe"):  # mpeg-ps, ac3, dts
        return True
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # mp3 frame, aac adts
        return True
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:  # mpeg-ts
        return True
    return False


_NOT_MEDIA = (
    (b"\x89PNG", "an image"), (b"\xff\xd8\xff", "an image"), (b"GIF8", "an image"), (b"BM", "an image"),
    (b"II*\x00", "an image"), (b"MM\x00*", "an image"),
    (b"PK\x03\x04", "an archive"), (b"PK\x05\x06", "an archive"), (b"\x1f\x8b", "compressed data"),
    (b"BZh", "compressed data"), (b"\xfd7zXZ", "compressed data"), (b"7z\xbc\xaf", "an archive"),
    (b"Rar!", "an archive"), (b"%PDF", "a PDF document"), (b"\x7fELF", "a program"), (b"MZ", "a program"),
    (b"\xca\xfe\xba\xbe", "a program"), (b"\xcf\xfa\xed\xfe", "a program"), (b"\x00asm", "a program"),
)


def sniff_not_media(head: bytes) -> str | None:
    """What `head` is when it is clearly not audio or video ("a web page", ...), else None.

    Known media containers pass; so does any other binary data, which ffprobe judges.
    """
    if not head:
        return "an empty file"
    if _media_magic(head):
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "an image"
    for magic, what in _NOT_MEDIA:
        if head.startswith(magic):
            return what
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<svg", b"<script")):
        return "a web page"
    if b"\x00" not in head:
        try:
            decoded = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            # A cut in the middle of the last character is still text.
            decoded = head[:exc.start].decode("utf-8") if exc.start >= len(head) - 3 else ""
        if decoded and sum(c.isprintable() or c in "\t\r\n" for c in decoded) >= 0.95 * len(decoded):
            return "text"
    return None


# -- downloading ---------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


async def download(url: str, dest: Path, max_bytes: int, timeout_s: float = 120.0, *,
                   connect_timeout_s: float = 10.0, read_timeout_s: float = 30.0,
                   max_redirects: int = MAX_REDIRECTS, rules: FetchRules = FetchRules()) -> int:
    """Download `url` to `dest` and return its size in bytes.

    Raises an InputError: LinkNotAllowedError, UnreachableError, TimedOutError,
    TooLargeError (past `max_bytes`) or NotAudioError. `dest` only appears when the
    download is complete and looks like media; a partial file never stays behind.
    Every hop is checked against `rules` (default: public sites only).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    timeouts = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            current = url
            for hop in range(max_redirects + 1):
                target = _check_hop(current, rules, hop)
                addresses = await resolve_target(target, rules)
                location, size = await _get(target, addresses, partial, max_bytes, timeouts)
                if location is None:
                    os.replace(partial, dest)
                    return size
                current = urljoin(target.url, location)
            raise UnreachableError(f"the link redirects more than {max_redirects} times")
    except TimeoutError:
        raise TimedOutError("the download took too long") from None
    except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch):
        raise UnreachableError("the site's secure connection could not be verified") from None
    except aiohttp.ClientConnectorError:
        raise UnreachableError("the site could not be reached") from None
    except aiohttp.ClientPayloadError:
        raise UnreachableError("the download was cut off") from None
    except aiohttp.ClientError as exc:
        raise UnreachableError(f"the file could not be downloaded ({exc.__class__.__name__})") from None
    finally:
        partial.unlink(missing_ok=True)


def _check_hop(url: str, rules: FetchRules, hop: int) -> Target:
    try:
        return check_url(url, rules)
    except LinkNotAllowedError:
        if hop and rules.origins:  # the CDN sent us elsewhere: say so, not "not on the CDN"
            raise LinkNotAllowedError(OFF_CDN_REDIRECT) from None
        raise


async def _get(target: Target, addresses: list[tuple[int, str]], partial: Path, max_bytes: int,
               timeouts: aiohttp.ClientTimeout) -> tuple[str | None, int]:
    """One request. Returns (redirect location, 0) or (None, bytes written to `partial`)."""
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(target.host, addresses), use_dns_cache=False,
                                     force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeouts, trust_env=False, auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", "Accept": "*/*"},
    ) as session:
        async with session.get(URL(target.url, encoded=True), allow_redirects=False) as response:
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise UnreachableError(f"the site answered HTTP {response.status} without saying where to")
                return location, 0
            if response.status != 200:
                raise UnreachableError(f"the site answered HTTP {response.status}")
            encoding = response.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                # Never decompressed (a small answer could unpack to gigabytes).
                raise NotAudioError(f"the site sent the file compressed ({encoding[:20]}), which is not accepted")
            declared = response.content_length
            if declared is not None and declared > max_bytes:
                raise TooLargeError(f"the file is {_size(declared)}, over the {_size(max_bytes)} limit")
            size = 0
            head = b""
            with open(partial, "wb") as out:  # noqa: ASYNC230 - a local file, read or written chunk by chunk as the network goes
                async for chunk in response.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLargeError(f"the file is over the {_size(max_bytes)} limit")
                    if len(head) < SNIFF_BYTES:
                        head += chunk[:SNIFF_BYTES - len(head)]
                        if len(head) >= SNIFF_BYTES:
                            _refuse_if_not_media(head)
                    out.write(chunk)
            if len(head) < SNIFF_BYTES:
                _refuse_if_not_media(head)
            return None, size


def _refuse_if_not_media(head: bytes) -> None:
    what = sniff_not_media(head)
    if what:
        raise NotAudioError(f"the file is {what}, not audio or video")
