"""core.storage.signed_links: signing, verification, refusals, and the persisted secret."""

from __future__ import annotations

import stat
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from core.storage.signed_links import LinkError, LinkSigner, load_or_create_secret, redact

SECRET = b"k" * 32
NOW = 1_700_000_000


def _parts(url: str) -> tuple[str, str, str]:
    """(path after /dl/, exp, sig) as the web server would see them."""
    split = urlsplit(url)
    query = parse_qs(split.query)
    return unquote(split.path.removeprefix("/dl/")), query["exp"][0], query["sig"][0]


def test_round_trip():
    signer = LinkSigner(SECRET, "https://stems.example.org/")
    url = signer.sign("42/vocals.mp3", NOW + 3600)
    assert url.startswith("https://stems.example.org/dl/42/vocals.mp3?exp=1700003600&sig=")
    path, exp, sig = urlsplit(url).path, *_parts(url)[1:]
    assert path == "/dl/42/vocals.mp3" and len(sig) == 64
    signer.verify("42/vocals.mp3", exp, sig, now=NOW)
    signer.verify("42/vocals.mp3", int(exp), sig.upper(), now=NOW + 3599)


def test_names_are_url_quoted_and_signed_unquoted():
    signer = LinkSigner(SECRET, "http://h")
    url = signer.sign("7/my song #1?.flac", NOW + 60)
    assert "/dl/7/my%20song%20%231%3F.flac?" in url
    path, exp, sig = _parts(url)
    assert path == "7/my song #1?.flac"
    signer.verify(path, exp, sig, now=NOW)


def test_expired_link_is_refused_as_expired():
    signer = LinkSigner(SECRET, "http://h")
    _, exp, sig = _parts(signer.sign("1/bass.mp3", NOW))
    with pytest.raises(LinkError) as caught:
        signer.verify("1/bass.mp3", exp, sig, now=NOW)
    assert caught.value.reason == "expired"


@pytest.mark.parametrize("tamper", ["path", "exp", "sig", "no_sig", "no_exp", "garbage_exp", "other_secret",
                                    "unicode_sig"])
def test_tampered_link_is_invalid(tamper):
    signer = LinkSigner(SECRET, "http://h")
    path, exp, sig = _parts(signer.sign("1/bass.mp3", NOW + 60))
    if tamper == "path":
        path = "2/bass.mp3"
    elif tamper == "exp":
        exp = str(int(exp) + 86400)
    elif tamper == "sig":
        sig = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    elif tamper == "no_sig":
        sig = None
    elif tamper == "no_exp":
        exp = None
    elif tamper == "garbage_exp":
        exp = "1e99"
    elif tamper == "other_secret":
        signer = LinkSigner(b"x" * 32, "http://h")
    elif tamper == "unicode_sig":
        sig = "é" * 64
    with pytest.raises(LinkError) as caught:
        signer.verify(path, exp, sig, now=NOW)
    assert caught.value.reason == "invalid"


@pytest.mark.parametrize("spelling", [
    "+{exp}", " {exp}", "{exp} ", "{exp}\n", "\t{exp}", "{head}_{tail}", "{wide}", "0x{hex}", "{exp}.0",
    "{exp}e0", "-{exp}", "", None,
])
def test_expiry_is_plain_ascii_digits_only(spelling):
    signer = LinkSigner(SECRET, "http://h")
    _, exp, sig = _parts(signer.sign("42/vocals.mp3", NOW + 3600))
    wide = "".join(chr(ord(c) - ord("0") + ord("\uff10")) for c in exp)  # full-width digits
    bad = None if spelling is None else spelling.format(exp=exp, head=exp[:4], tail=exp[4:], wide=wide,
                                                         hex=f"{int(exp):x}")
    # Each of these int()s to the signed value, or near it: all are refused as forged.
    with pytest.raises(LinkError) as refused:
        signer.verify("42/vocals.mp3", bad, sig, now=NOW)
    assert refused.value.reason == "invalid"
    signer.verify("42/vocals.mp3", exp, sig, now=NOW)  # the link as signed still works
    signer.verify("42/vocals.mp3", "0" + exp, sig, now=NOW)  # digits all the same


def test_an_expired_forgery_is_invalid_not_expired():
    signer = LinkSigner(SECRET, "http://h")
    with pytest.raises(LinkError) as caught:
        signer.verify("1/bass.mp3", NOW - 10, "0" * 64, now=NOW)
    assert caught.value.reason == "invalid"


@pytest.mark.parametrize("path", ["../etc/passwd", "1/../../etc/passwd", "/etc/passwd", "1\\..\\x",
                                  "1/./x", "1//x", "", "..", "1/x\x00.mp3"])
def test_traversal_paths_are_refused(path):
    signer = LinkSigner(SECRET, "http://h")
    with pytest.raises(ValueError):
        signer.sign(path, NOW + 60)
    # Even with a correct signature over the bad path, verification refuses it.
    with pytest.raises(LinkError) as caught:
        signer.verify(path, NOW + 60, signer.signature(path, NOW + 60), now=NOW)
    assert caught.value.reason == "invalid"


def test_short_secret_is_refused():
    with pytest.raises(ValueError):
        LinkSigner(b"short", "http://h")


def test_secret_is_created_private_and_reused(tmp_path):
    data = tmp_path / "data"
    first = load_or_create_secret(data, None)
    assert len(first) == 32
    secret_file = data / "link_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert load_or_create_secret(data, None) == first
    assert load_or_create_secret(data, "") == first  # an empty setting means "not set"
    assert [p.name for p in data.iterdir()] == ["link_secret"]  # no temporary files left
    # Links signed before a restart still verify after it.
    url = LinkSigner(first, "http://h").sign("3/drums.mp3", NOW + 60)
    LinkSigner(load_or_create_secret(data, None), "http://h").verify(*_parts(url), now=NOW)


def test_env_secret_wins_and_writes_nothing(tmp_path):
    assert load_or_create_secret(tmp_path, "from the environment!") == b"from the environment!"
    assert not (tmp_path / "link_secret").exists()


def test_loose_mode_is_tightened_and_corrupt_secret_replaced(tmp_path):
    first = load_or_create_secret(tmp_path, None)
    secret_file = tmp_path / "link_secret"
    secret_file.chmod(0o644)
    assert load_or_create_secret(tmp_path, None) == first
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret_file.write_text("not hex")
    replaced = load_or_create_secret(tmp_path, None)
    assert len(replaced) == 32 and replaced != first
    assert load_or_create_secret(tmp_path, None) == replaced


def test_redact_strips_the_query():
    url = LinkSigner(SECRET, "https://h:8443/base").sign("9/other.mp3", NOW)
    assert redact(url) == "https://h:8443/base/dl/9/other.mp3"
    assert "sig" not in redact(url) and "exp" not in redact(url)
    assert redact("/dl/1/a.mp3?exp=1&sig=2#frag") == "/dl/1/a.mp3"
