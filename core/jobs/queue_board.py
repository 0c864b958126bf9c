"""The queue's places, computed once per change of the queue and shared by every reader.

A finished job moves every queued job up one place, and each of their status messages
asks for its place: computing the fair order for each would be n times n log n on the
bot's event loop. The board keeps the last order (job id -> place) and computes it again
only when this process changed the queue (`changed`) or the order is older than
`max_age_s` (another process may have changed it). Concurrent readers of a stale board
wait for one computation instead of each starting their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class QueuePlaces:
    """One computed fair order: 1-based place of each queued job, and how many there are."""

    places: dict[int, int]
    length: int

    @classmethod
    def of(cls, order: list[int]) -> QueuePlaces:
        return cls({job_id: k for k, job_id in enumerate(order, start=1)}, len(order))


class QueueBoard:
    """Caches `QueuePlaces` computed by `compute` (which should do its pure-Python part in
    a thread). `computations` counts how often the order was computed."""

    def __init__(self, compute: Callable[[], Awaitable[list[int]]], max_age_s: float = 1.0) -> None:
        self._compute = compute
        self.max_age_s = max_age_s
        self._version = 0
        self._places: QueuePlaces | None = None
        self._computed_version = -1
        self._computed_at = 0.0
        self._computing: asyncio.Future[QueuePlaces] | None = None
        self.computations = 0

    def changed(self) -> None:
        """The queue changed here (admission, claim, cancel, requeue): the next read recomputes."""
        self._version += 1

    def _fresh(self) -> bool:
        return (self._places is not None and self._computed_version == self._version
                and time.monotonic() - self._computed_at < self.max_age_s)

    async def places(self) -> QueuePlaces:
        if self._fresh():
            assert self._places is not None
            return self._places
        computing = self._computing
        if computing is None:
            computing = self._computing = asyncio.get_running_loop().create_future()
            asyncio.ensure_future(self._refresh(computing))
        # Shielded: one reader cancelled (its message closed) does not cancel the others' result.
        return await asyncio.shield(computing)

    async def _refresh(self, target: asyncio.Future[QueuePlaces]) -> None:
        version, started = self._version, time.monotonic()
        try:
            self.computations += 1
            places = QueuePlaces.of(await self._compute())
        except BaseException as exc:  # handed to every waiting reader, then re-raised if not an Exception
            self._computing = None
            if not target.done():
                target.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._computing = None
        # Stamped with the version and time it began at: a change during the computation
        # makes it stale at once for later readers (those waiting take it, as they would
        # have a moment earlier).
        self._places, self._computed_version, self._computed_at = places, version, started
        if not target.done():
            target.set_result(places)
