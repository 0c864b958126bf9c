"""What S3 would decide about a browser-form (POST) upload, for tests.

Moto stores whatever a POST sends: it checks neither the policy's signature nor any of
its conditions (key, size, expiry). The tests check the policies the bot signs with this
instead, written from S3's documentation ("Creating a POST policy", SigV4): the signature
must be the HMAC of the base64 policy under the secret's signing key, the policy must not
have expired, every condition must hold, and every form field sent (but the signature,
the policy, the file and `x-ignore-` ones) must be named by a condition.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

SECRET = "testing"  # the test S3 fixture's secret key
_EXEMPT = {"x-amz-signature", "policy", "file"}


def signed_policy(fields: dict[str, str], secret: str = SECRET) -> dict[str, Any]:
    """The policy document that `fields` carry, once its SigV4 signature checks out."""
    credential = fields["x-amz-credential"].split("/")
    date, region, service = credential[1], credential[2], credential[3]
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, fields["policy"].encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, fields.get("x-amz-signature", "")):
        raise AssertionError("the POST policy's signature does not check out")
    return json.loads(base64.b64decode(fields["policy"]))


def expires_at(policy: dict[str, Any]) -> float:
    """The policy's expiration, as a Unix time."""
    text = policy["expiration"].replace("Z", "+00:00")
    return datetime.fromisoformat(text).astimezone(UTC).timestamp()


def s3_accepts(post: dict[str, Any], *, bucket: str, key: str, size: int, now: float,
               secret: str = SECRET) -> bool:
    """Whether S3 would store a file of `size` bytes under `key` in `bucket`, sent at `now`
    with `post`'s fields (the uploader's own "key" field replacing any in them)."""
    sent = {**post["fields"], "key": key}
    try:
        policy = signed_policy(post["fields"], secret)
    except AssertionError:
        return False
    if now >= expires_at(policy):
        return False
    values = {name.lower(): value for name, value in sent.items()}
    values["bucket"] = bucket
    named: set[str] = set()
    for condition in policy["conditions"]:
        if isinstance(condition, dict):
            ((name, value),) = condition.items()
            named.add(name.lower())
            if values.get(name.lower()) != value:
                return False
            continue
        operator, *args = condition
        if operator == "content-length-range":
            if not args[0] <= size <= args[1]:
                return False
            continue
        field, value = args[0].lstrip("$").lower(), args[1]
        named.add(field)
        actual = values.get(field)
        if actual is None:
            return False
        if operator == "eq" and actual != value:
            return False
        if operator == "starts-with" and not actual.startswith(value):
            return False
    return all(name.lower() in named for name in sent
               if name.lower() not in _EXEMPT and not name.lower().startswith("x-ignore-"))
