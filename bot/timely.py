"""Answering an interaction within Discord's 3 s when the work before the answer is slow.

Discord forgets an interaction not answered (nor deferred) within 3 s: a later answer gets
404 Unknown interaction and the member sees "The application did not respond". A command
that reads or writes the database before it answers (a locked SQLite file, a busy
PostgreSQL) can take that long. `TimelyAnswer` answers at once when the work is quick, and
defers ("thinking…") when it is not, so that the answer replaces the placeholder later.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import discord

# Well inside Discord's 3 s, leaving room for the defer request itself.
DEFER_AFTER_S = 1.5


class TimelyAnswer:
    """The single answer to an interaction; defers it after `defer_after_s` if not given yet.

        async with TimelyAnswer(interaction, ephemeral=True) as answer:
            text = await slow_lookup()
            await answer.send(text)

    `ephemeral` is fixed when the interaction is deferred; `send(private=True)` keeps an
    answer private even after a public defer (the placeholder is replaced by a message
    only the member sees).
    """

    def __init__(self, interaction: discord.Interaction, *, ephemeral: bool,
                 defer_after_s: float = DEFER_AFTER_S) -> None:
        self.interaction = interaction
        self.ephemeral = ephemeral
        self.defer_after_s = defer_after_s
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None

    def start(self) -> TimelyAnswer:
        """Start the clock. Used without `async with`, the timer is left to run out: it
        defers only if nothing was answered by then (checked under the lock)."""
        self._timer = asyncio.create_task(self._defer_later())
        return self

    async def __aenter__(self) -> TimelyAnswer:
        return self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop_timer()

    @property
    def deferred(self) -> bool:
        return self.interaction.response.is_done()

    async def _defer_later(self) -> None:
        await asyncio.sleep(self.defer_after_s)
        async with self._lock:
            if not self.interaction.response.is_done():
                await self.interaction.response.defer(ephemeral=self.ephemeral, thinking=True)

    async def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is None:
            return
        if not timer.done():
            timer.cancel()
        with contextlib.suppress(asyncio.CancelledError, discord.HTTPException):
            await timer

    async def defer(self) -> None:
        """Defer now, unless done already (the work is known to be long)."""
        async with self._lock:
            await self._stop_timer()
            if not self.interaction.response.is_done():
                await self.interaction.response.defer(ephemeral=self.ephemeral, thinking=True)

    async def send(self, content: str, *, private: bool = False, **fields: Any) -> None:
        """The answer: the interaction's response, or (once deferred) the placeholder's replacement."""
        async with self._lock:
            # Holding the lock, the timer is asleep or done: never cancelled mid-request.
            await self._stop_timer()
            response = self.interaction.response
            if not response.is_done():
                await response.send_message(content, ephemeral=self.ephemeral or private, **fields)
            elif private and not self.ephemeral:
                # The public placeholder would show the answer to everyone: replace it with
                # a follow-up only the member sees.
                with contextlib.suppress(discord.NotFound):
                    await self.interaction.delete_original_response()
                await self.interaction.followup.send(content, ephemeral=True, **fields)
            else:
                await self.interaction.edit_original_response(content=content, **fields)
