"""Signed, expiring download links for stems too large to attach.

A link is `<base_url>/dl/<job_id>/<file>?exp=<unix time>&sig=<hex>`, where `sig` is
HMAC-SHA256 over `"<job_id>/<file>\\n<exp>"`. Anyone holding a link can download the
file until it expires, so a signed URL is a bearer token: never log one (see `redact`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

SECRET_FILE = "link_secret"
SECRET_BYTES = 32
DEFAULT_LINK_TTL_S = 24 * 3600
# `sign` writes the expiry as plain ASCII digits. int() would also take "+1", " 1", "1_0"
# or other scripts' digits, so one signature would match many spellings of a link.
_EXPIRY = re.compile(r"[0-9]+")


class LinkError(Exception):
    """A download link was refused. `reason` is "expired" or "invalid"."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def is_safe_path(path: str) -> bool:
    """Whether `path` is relative, slash-separated, and has no empty, `.` or `..` part."""
    if not path or "\\" in path or "\x00" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


class LinkSigner:
    """Signs and verifies download links under one secret."""

    def __init__(self, secret: bytes, base_url: str):
        if len(secret) < 16:
            raise ValueError("the link secret (STEMBOT_LINK_SECRET) must be at least 16 bytes")
        self._secret = secret
        self.base_url = base_url.rstrip("/")

    def signature(self, path: str, exp: int) -> str:
        message = f"{path}\n{int(exp)}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, path: str, expires_at: int | float) -> str:
        """A full URL for `path` ("<job_id>/<file name>"), valid until `expires_at` (unix time)."""
        if not is_safe_path(path):
            raise ValueError(f"refusing to sign an unsafe path {path!r}")
        exp = int(expires_at)
        return f"{self.base_url}/dl/{quote(path, safe='/')}?exp={exp}&sig={self.signature(path, exp)}"

    def sign_file(self, job_id: int | str, file_name: str, ttl_s: float = DEFAULT_LINK_TTL_S,
                  now: float | None = None) -> str:
        """A link to one stem file of a job, valid for `ttl_s` from now."""
        now = time.time() if now is None else now
        return self.sign(f"{job_id}/{file_name}", now + ttl_s)

    def sign_player(self, job_id: int | str, expires_at: int | float) -> str:
        """A link to a job's stem player (`core.ops.player`), valid until `expires_at`. It signs
        "<job_id>/player", a path no stem file has (theirs end in an extension)."""
        path = f"{job_id}/player"
        if not is_safe_path(path):
            raise ValueError(f"refusing to sign an unsafe path {path!r}")
        exp = int(expires_at)
        return f"{self.base_url}/player/{quote(str(job_id), safe='')}?exp={exp}&sig={self.signature(path, exp)}"

    def verify(self, path: str, exp: int | str | None, sig: str | None, now: float | None = None) -> None:
        """Raise `LinkError` unless `sig` is this signer's signature of `path` and `exp`, and
        `exp` is in the future. The signature is checked first, so a forged link is
        "invalid", never "expired"."""
        if not is_safe_path(path):
            raise LinkError("invalid", "unsafe path")
        if isinstance(exp, int) and not isinstance(exp, bool) and exp >= 0:
            exp_int = exp
        elif isinstance(exp, str) and _EXPIRY.fullmatch(exp):
            try:
                exp_int = int(exp)
            except ValueError:  # more digits than Python converts
                raise LinkError("invalid", "bad expiry") from None
        else:
            raise LinkError("invalid", "bad expiry")
        # hex digests only; compare bytes so a non-ASCII `sig` cannot raise TypeError
        expected = self.signature(path, exp_int).encode("ascii")
        given = (sig or "").lower().encode("utf-8", "replace")
        if not sig or not hmac.compare_digest(expected, given):
            raise LinkError("invalid", "bad signature")
        now = time.time() if now is None else now
        if exp_int <= now:
            raise LinkError("expired", "link expired")


def redact(url: str) -> str:
    """`url` without its query and fragment, safe to log (the signature lives in the query)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def load_or_create_secret(data_dir: Path, env_secret: str | None) -> bytes:
    """The link-signing secret: `env_secret` (STEMBOT_LINK_SECRET) if set, else 32 random
    bytes kept in `data_dir/link_secret` (mode 0600), so links survive restarts."""
    if env_secret:
        return env_secret.encode("utf-8")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    existing = _read_secret(path)
    if existing is not None:
        return existing
    # Written to a private temporary file, then hard-linked into place: the link fails if
    # another process got there first, and no reader ever sees a half-written secret.
    secret = secrets.token_bytes(SECRET_BYTES)
    tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secret.hex() + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Another process won the race, or a corrupt file is in the way.
            winner = _read_secret(path)
            if winner is not None:
                return winner
            log.warning("replacing unreadable link secret %s; earlier links stop working", path)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return secret


def _read_secret(path: Path) -> bytes | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        return None
    if len(secret) < 16:
        return None
    _tighten_mode(path)
    return secret


def _tighten_mode(path: Path) -> None:
    # A secret restored from a backup may come back world-readable.
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass
