"""A model host that runs one job at a time (on a CPU, where batching was measured slower)."""

from __future__ import annotations

import os
import queue
import time
from typing import TYPE_CHECKING

from core.host.protocol import DoneEvent, JobResult, JobSpec

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from core.host.steps import JobSteps


class SerialHost:
    """Each job from decode to encode before the next one."""

    def __init__(self, steps: JobSteps):
        self.steps = steps

    def serve(self, requests: Queue[JobSpec | None]) -> None:
        """Run the jobs that come until None, or until the bot is gone."""
        while True:
            try:
                spec = requests.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != self.steps.parent:
                    return  # the bot died; nobody will read our results
                continue
            if spec is None:
                return
            self.run(spec)

    def run(self, spec: JobSpec) -> None:
        """Run one job; its end (done, failed or cancelled) is reported as an event."""
        def separate() -> None:
            self.steps.send(DoneEvent(spec.job_id, self.separate(spec)))

        self.steps.guarded(spec.job_id, separate)

    def separate(self, spec: JobSpec) -> JobResult:
        """Prepare, separate and finish one job (its stages reported, not its end)."""
        steps = self.steps
        prepared = steps.prepare(spec)
        try:
            steps.stage(spec.job_id, "separating", duration_s=prepared.duration_s)
            started = time.monotonic()
            stems, names = steps.clean_pass(prepared, *steps.separate_alone(prepared))
            separation_s = time.monotonic() - started
            steps.stage(spec.job_id, "encoding")
            return steps.finish(prepared, stems, names, separation_s)
        finally:
            prepared.cleanup()
