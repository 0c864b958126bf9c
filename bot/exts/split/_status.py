"""The status message of a job: what it says, and editing it no faster than Discord allows."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.jobs.job import Job, JobState
from core.jobs.quotas import format_factor
from core.jobs.recent import RecentKeys
from core.media.audio import format_duration

log = logging.getLogger(__name__)

STAGES = {
    JobState.queued: ("⏳", "Queued"),
    JobState.fetching: ("📥", "Downloading"),
    JobState.decoding: ("🎧", "Decoding"),
    JobState.separating: ("🎛️", "Separating"),
    JobState.encoding: ("💾", "Encoding"),
    JobState.delivering: ("📤", "Uploading"),
}

STEMS_LABEL = {"all": "all stems", "karaoke": "karaoke (vocals + instrumental)"}


def progress_bar(fraction: float, width: int = 16) -> str:
    """`▰▰▰▰▱▱▱▱` with `width` cells; always at least one empty cell before 100%."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(fraction * width)
    if fraction < 1.0:
        filled = min(filled, width - 1)
    return "▰" * filled + "▱" * (width - filled)


def eta_seconds(fraction: float, elapsed_s: float) -> float | None:
    """Remaining time extrapolated from the elapsed time; None until it means something."""
    if fraction < 0.05 or elapsed_s < 1.0:
        return None
    return elapsed_s * (1.0 - fraction) / fraction


# Places shown exactly (with the queue's length); further back, a rounded place and no
# length, so that one finished job edits a few hundred messages of a long queue, not all.
EXACT_PLACES = 10


def shown_place(position: int) -> int:
    """`position` rounded down to two significant digits (1234 -> 1200): the text of a
    message far back in the queue changes only when this does."""
    step = 10 ** max(len(str(position)) - 2, 0)
    return position // step * step


@dataclass(frozen=True)
class StatusView:
    """What the status message needs to know beyond the job row."""

    position: int | None = None
    queue_length: int = 0
    stage_elapsed_s: float = 0.0
    worker_ready: bool = True


def describe_request(job: Job) -> str:
    stems = STEMS_LABEL.get(job.stems, job.stems.replace(",", ", "))
    model = f"{job.model} → {job.clean_model}" if job.clean_model else job.model
    text = f"{stems} · {job.format}" + (f" · {model}" if model else "")
    # A dearer model's minutes are charged at its factor: said where the member watches the job.
    factor = job.cost_factor or 1.0  # None on a row not yet written
    return text + (f" · minutes count {format_factor(factor)}" if factor != 1.0 else "")


def render_status(job: Job, view: StatusView = StatusView()) -> str:
    """The text of a job's status message while it is unfinished."""
    state = job.job_state
    icon, label = STAGES.get(state, ("•", state.value.title()))
    header = f"{icon} **{label}** `{job.source_name}` — {describe_request(job)}"
    if state is JobState.queued:
        if view.position is None:
            line = "Waiting for a worker…"
        elif view.position == 1:
            line = "Next in line." if view.worker_ready else "Next in line; the separation engine is warming up."
        elif view.position <= EXACT_PLACES:
            line = f"Position **{view.position}** of {view.queue_length} in the queue."
        else:
            line = f"Position **~{shown_place(view.position):,}** in the queue."
        return f"{header}\n{line}"
    if state is JobState.separating:
        fraction = job.progress or 0.0
        eta = eta_seconds(fraction, view.stage_elapsed_s)
        tail = f" · about {format_duration(eta)} left" if eta is not None else ""
        length = f" ({format_duration(job.duration_s)} of audio)" if job.duration_s else ""
        return f"{header}\n`{progress_bar(fraction)}` {fraction * 100:3.0f}%{tail}{length}"
    return header


Editor = Callable[[Job, str], Awaitable[None]]
# Closed jobs the board remembers (see StatusBoard._closed).
CLOSED_KEPT = 1000


class StatusBoard:
    """Keeps each job's status message current with at most one edit per `interval_s`.

    Updates that arrive faster are merged: only the latest text is sent. Discord allows
    about 5 edits per 2 s per interaction; one edit every ~1.6 s stays well inside it.
    """

    def __init__(self, editor: Editor, render: Callable[[Job], Awaitable[str]], interval_s: float = 1.6):
        self.editor = editor
        self.render = render
        self.interval_s = interval_s
        self._latest: dict[int, Job] = {}
        self._last_edit: dict[int, float] = {}
        self._last_text: dict[int, str] = {}
        self._tasks: dict[int, asyncio.Task] = {}
        self._editing: set[int] = set()  # jobs whose edit request is in flight
        # Jobs whose final message is written: a late update must not overwrite it. Only
        # the last ones closed are kept (updates come late by seconds, not by thousands of
        # jobs), so that the board does not grow with every job the bot ever ran.
        self._closed: RecentKeys[int] = RecentKeys(CLOSED_KEPT)

    def update(self, job: Job) -> None:
        if job.id in self._closed or job.is_final:
            return
        self._latest[job.id] = job
        if job.id not in self._tasks:
            self._tasks[job.id] = asyncio.create_task(self._flush(job.id))

    async def _flush(self, job_id: int) -> None:
        try:
            while job_id in self._latest:
                wait = self._last_edit.get(job_id, 0.0) + self.interval_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                job = self._latest.pop(job_id, None)
                if job is None or job_id in self._closed:
                    return
                text = await self.render(job)
                if text == self._last_text.get(job_id):
                    continue
                self._last_edit[job_id] = time.monotonic()
                self._last_text[job_id] = text
                self._editing.add(job_id)
                try:
                    await self.editor(job, text)
                except Exception:
                    log.warning("job %s: status edit failed", job_id, exc_info=True)
                finally:
                    self._editing.discard(job_id)
        finally:
            self._tasks.pop(job_id, None)

    async def close(self, job_id: int) -> None:
        """Stop updating `job_id` (its final message is about to be written) and wait
        until an edit in flight is done, so that it cannot overwrite the final one."""
        self._closed.add(job_id)
        self._latest.pop(job_id, None)
        task = self._tasks.pop(job_id, None)
        if task is not None and task is not asyncio.current_task():
            if job_id not in self._editing:
                # Waiting for its turn (or not even started): nothing was sent yet.
                # An edit already sent is awaited, not abandoned: Discord could still
                # apply it after the final message.
                task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        remaining = self._last_edit.pop(job_id, 0.0) + self.interval_s - time.monotonic()
        self._last_text.pop(job_id, None)
        if remaining > 0:
            await asyncio.sleep(remaining)

    def tracked_jobs(self) -> int:
        """How many jobs the board holds anything for (bounded: for tests and metrics)."""
        per_job = (self._latest, self._last_edit, self._last_text, self._tasks, self._editing)
        return len(set().union(*per_job)) + len(self._closed)
