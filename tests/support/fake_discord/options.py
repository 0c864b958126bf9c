"""Builders for the options that tests pass to `FakeDiscord.send_slash_command`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .records import FakeAttachment


def string_option(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "type": 3, "value": value}


def integer_option(name: str, value: int) -> dict[str, Any]:
    return {"name": name, "type": 4, "value": value}


def boolean_option(name: str, value: bool) -> dict[str, Any]:
    return {"name": name, "type": 5, "value": value}


def attachment_option(name: str, attachment: dict[str, Any] | FakeAttachment) -> dict[str, Any]:
    """An attachment option; the fake fills `resolved.attachments` from its store by id."""
    attachment_id = attachment.id if isinstance(attachment, FakeAttachment) else attachment["id"]
    return {"name": name, "type": 11, "value": str(attachment_id)}


def subcommand_option(name: str, options: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"name": name, "type": 1, "options": list(options)}
