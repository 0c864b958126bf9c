"""An event sink for driving a model host's steps in-process (what the host's pipe would carry)."""

from __future__ import annotations

from core.host.protocol import HostEvent


class CollectedEvents:
    """Keeps every event a host's steps send, in order."""

    def __init__(self):
        self.items: list[HostEvent] = []

    def put(self, item: HostEvent) -> None:
        self.items.append(item)
