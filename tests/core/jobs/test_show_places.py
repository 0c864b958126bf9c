"""After the queue moves, the dispatcher redraws the queued jobs' places from one order
computation, a step at a time, so the event loop runs between steps instead of running
every redraw in one turn."""

from __future__ import annotations

import asyncio

from core.jobs.dispatcher import PLACES_PER_STEP, AttachedBackend, Dispatcher
from core.jobs.job import Job
from core.storage.local import LocalStorage
from tests.support.quota_db import admit


class Places:
    """A notifier that notes each place shown, in the order shown, in a shared log."""

    def __init__(self, store, log: list) -> None:
        self.store, self.log = store, log

    async def job_changed(self, job: Job) -> None:
        snapshot = await self.store.queue_snapshot(job.id)
        self.log.append(("place", job.id, snapshot.position))

    async def deliver(self, job: Job) -> None:
        return None

    async def job_ended(self, job: Job) -> None:
        return None


class NoExecution(AttachedBackend):
    """Nothing runs here."""


async def test_places_are_redrawn_from_one_order_a_step_at_a_time(db, tmp_path):
    store = db.store()
    jobs = [await admit(store, user_id=k, status_message_id=1000 + k) for k in range(3 * PLACES_PER_STEP + 7)]
    log: list = []
    dispatcher = Dispatcher(store, LocalStorage(tmp_path), Places(store, log), NoExecution())
    computed = store.board.computations
    running = True

    async def other_work() -> None:  # anything else the bot does meanwhile (a /queue, the gateway)
        while running:
            log.append(("other",))
            await asyncio.sleep(0)

    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    await dispatcher.show_places(jobs)
    while sum(entry[0] == "place" for entry in log) < len(jobs):
        await asyncio.sleep(0)
    running = False
    await other

    shown = [entry for entry in log if entry[0] == "place"]
    assert sorted(job_id for _, job_id, _ in shown) == [job.id for job in jobs]
    assert sorted(place for _, _, place in shown) == list(range(1, len(jobs) + 1))
    assert store.board.computations == computed + 1  # one order for every message
    longest, run = 0, 0
    for entry in log:
        run = run + 1 if entry[0] == "place" else 0
        longest = max(longest, run)
    assert longest <= PLACES_PER_STEP  # the loop ran other work between steps
