"""Errors that carry a short message fit to show a user (Discord reply, CLI `error:` line).

Anything that is not a `StembotError` is a bug: callers log it in full and show a
generic message instead.
"""

from __future__ import annotations


class StembotError(Exception):
    """Base class. `reason` is short, specific, and safe to show to the user."""

    #: a stable machine-readable kind, used for metrics and tests
    kind = "error"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InputError(StembotError):
    """The user's input was refused. Nobody is charged for it."""

    kind = "bad_input"


def input_error_kinds() -> frozenset[str]:
    """The kinds of every InputError defined so far: a job that failed with one of them
    failed on what its user sent (or could not be taken now), not on stembot's side."""
    kinds: set[str] = set()
    pending: list[type[InputError]] = [InputError]
    while pending:
        cls = pending.pop()
        kinds.add(cls.kind)
        pending.extend(cls.__subclasses__())
    return frozenset(kinds)


class NotAudioError(InputError):
    kind = "not_audio"


class CorruptMediaError(InputError):
    kind = "corrupt"


class UnsupportedMediaError(InputError):
    kind = "unsupported"


class TooLongError(InputError):
    kind = "too_long"


class TooShortError(InputError):
    kind = "too_short"


class TooLargeError(InputError):
    kind = "too_large"


class LinkNotAllowedError(InputError):
    """A link stembot will not open: not http(s), an odd port, credentials, or an address
    that is not on the public internet."""

    kind = "link_not_allowed"


class UnreachableError(InputError):
    """The link is allowed but the file could not be fetched (DNS, connection, HTTP status)."""

    kind = "unreachable"


class TimedOutError(InputError):
    kind = "timed_out"


class BadRequestError(InputError):
    """A request that makes no sense (unknown stem name, bad option)."""

    kind = "bad_request"


class ModelUnavailableError(StembotError):
    """The model cannot be loaded here (not provisioned, unknown, or broken)."""

    kind = "model_unavailable"


class DeviceUnavailableError(StembotError):
    kind = "device_unavailable"


class DeviceOutOfMemoryError(StembotError):
    """The worker's device ran out of memory even on a single segment of the track."""

    kind = "out_of_memory"


class JobCancelled(StembotError):
    """Raised from a progress callback to stop a separation promptly."""

    kind = "cancelled"

    def __init__(self, reason: str = "cancelled"):
        super().__init__(reason)


class LowDiskError(InputError):
    """Not enough free disk space to take or stage this track now. Not the user's fault,
    but like a refused input nobody is charged."""

    kind = "low_disk"


class EncodeError(StembotError):
    kind = "encode_failed"


class DeliveryTooLargeError(StembotError):
    """The stems fit no upload, even at the smallest encoding, and no download links are set up."""

    kind = "too_large_to_deliver"
