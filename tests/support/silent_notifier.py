"""A dispatcher's notifier that tells nobody anything: for tests of what the dispatcher
itself does with the rows."""

from __future__ import annotations


class Silent:
    async def job_changed(self, job):
        return None

    async def deliver(self, job):
        return None

    async def job_ended(self, job):
        return None
