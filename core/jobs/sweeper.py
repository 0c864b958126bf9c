"""The sweeper: periodic housekeeping that makes crashes and forgotten files harmless.

- Takes back running jobs whose heartbeat went stale (their run died, hung or lost its
  database): back to the queue, or failed when out of attempts (`JobStore.recover_stale`).
- Has the bot start again the deliveries a database error cut short
  (`Dispatcher.resume_deliveries`).
- Settles finished jobs that still hold a slot or a reservation, and recounts the slot
  counters from the jobs, so quota never leaks.
- Deletes inputs and stems once they are older than the retention time (their signed
  links stop working with them), and the leftovers of failed or cancelled jobs, of
  jobs whose row is gone, and of interrupted encodes.
- Deletes the rows of jobs that ended longer ago than the job history (and than the
  retention), in batches, so the jobs table does not grow with every job ever run.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from core.db import utcnow
from core.jobs.job import FINAL, JobState
from core.jobs.store import JobStore, Recovered
from core.storage.local import LocalStorage

log = logging.getLogger(__name__)

# Leftovers younger than this may still be in use (a download, an encode in progress).
GRACE_S = 3600.0
# A job whose status message was never created (the reply failed) is cancelled after this.
UNATTACHED_AFTER_S = 600.0
# The rows of finished jobs are kept this long by default (STEMBOT_JOB_HISTORY_DAYS).
HISTORY_S = 30 * 86400.0


@dataclass
class SweepReport:
    settled: list[int] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    forgotten: int = 0  # rows of old jobs deleted


# Told of the jobs taken back from stale runs (Dispatcher.recovered).
OnRecovered = Callable[[list[Recovered]], Awaitable[None]]
# Starts again the deliveries a database error cut short (Dispatcher.resume_deliveries).
ResumeDeliveries = Callable[[], Awaitable[object]]


class Sweeper:
    def __init__(self, store: JobStore, storage: LocalStorage, retention_s: float, interval_s: float = 300.0,
                 history_s: float = HISTORY_S, stale_s: float = 300.0, max_attempts: int = 3,
                 on_recovered: OnRecovered | None = None, resume_deliveries: ResumeDeliveries | None = None):
        self.store = store
        self.storage = storage
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.history_s = history_s
        self.stale_s = stale_s
        self.max_attempts = max_attempts
        self.on_recovered = on_recovered
        self.resume_deliveries = resume_deliveries

    async def run(self) -> None:
        """A sweep every interval_s; stale runs looked for more often, every stale_s / 4,
        so a stuck job is back in the queue (or failed) within 1.25 x stale_s."""
        loop = asyncio.get_running_loop()
        last_sweep: float | None = None
        while True:
            try:
                await self.recover_stale()
                if last_sweep is None or loop.time() - last_sweep >= self.interval_s:
                    last_sweep = loop.time()
                    report = await self.sweep()
                    if report.settled or report.expired or report.removed or report.forgotten:
                        log.info("sweeper: settled %d, expired %d, removed %d leftovers, deleted %d old job rows",
                                 len(report.settled), len(report.expired), len(report.removed), report.forgotten)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweeper round failed")
            await asyncio.sleep(min(self.interval_s, self.stale_s / 4))

    async def recover_stale(self) -> list[Recovered]:
        """Take back the running jobs whose heartbeat is older than stale_s, and say so;
        have the deliveries a database error cut short started again."""
        recovered = await self.store.recover_stale(self.stale_s, self.max_attempts)
        if recovered and self.on_recovered is not None:
            await self.on_recovered(recovered)
        if self.resume_deliveries is not None:
            await self.resume_deliveries()
        return recovered

    async def sweep(self, now: float | None = None) -> SweepReport:
        report = SweepReport()
        await self.store.cancel_unattached(utcnow() - timedelta(seconds=UNATTACHED_AFTER_S))
        report.settled = await self.store.settle_finished()
        await self.store.reconcile_slots()
        report.expired = await self.expire(utcnow() - timedelta(seconds=self.retention_s))
        report.removed = await self._leftovers(time.time() if now is None else now)
        # Rows go only after their files (the retention above marks them deleted).
        history_cutoff = utcnow() - timedelta(seconds=max(self.history_s, self.retention_s))
        report.forgotten = await self.store.delete_history(history_cutoff)
        return report

    async def expire(self, before: datetime, user_id: int | None = None) -> list[int]:
        """Delete the files of the finished jobs that ended before `before` (only those of
        `user_id`: /forget), wherever the storage keeps them, and mark them deleted: their
        download links stop working, and the results cache no longer offers them."""
        expired = []
        for job in await self.store.finished_before(before, user_id=user_id):
            await self.storage.delete_job(job.id)
            await self.store.update(job.id, artifacts_deleted_at=utcnow())
            expired.append(job.id)
        return expired

    async def _leftovers(self, now: float) -> list[str]:
        removed: list[str] = []
        for folder in sorted(self.storage.root.iterdir()):
            if not folder.is_dir() or not folder.name.isdigit():
                continue
            job = await self.store.get(int(folder.name))
            age = now - folder.stat().st_mtime
            if job is None:
                if age > GRACE_S:
                    removed.append(str(folder))
                    await asyncio.to_thread(shutil.rmtree, folder, True)
                continue
            if job.job_state in (JobState.failed, JobState.cancelled):
                removed.append(str(folder))
                await asyncio.to_thread(shutil.rmtree, folder, True)
                continue
            if job.job_state in FINAL:
                for path in folder.glob("input*"):
                    removed.append(str(path))
                    path.unlink(missing_ok=True)
            for path in folder.glob(".*.partial-*"):
                if now - path.stat().st_mtime > GRACE_S:
                    removed.append(str(path))
                    await asyncio.to_thread(shutil.rmtree, path, True)
        return removed
