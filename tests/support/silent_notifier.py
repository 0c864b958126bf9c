"""A dispatcher's notifier that tells nobody anything (Silent), or records only the job
ends it would tell (EndRecorder): for tests of what the dispatcher itself does with the rows."""

from __future__ import annotations


class Silent:
    async def job_changed(self, job):
        return None

    async def deliver(self, job):
        return None

    async def job_ended(self, job):
        return None


class EndRecorder(Silent):
    """Tells nobody, but records each job end reported: (job id, state, error)."""

    def __init__(self) -> None:
        self.ended: list[tuple[int, str, str | None]] = []

    async def job_ended(self, job):
        self.ended.append((job.id, job.state, job.error))
