"""The model host: a spawned child process that owns the Demucs model.

It loads the model once, warms it up, then runs jobs: decode -> separate -> encode,
reporting each stage and the progress on an event queue. On a CPU it runs one job at a
time (`SerialHost`). On a GPU it runs several (`BatchingHost`): they decode and encode in
threads while the main thread stacks the segments of all jobs being separated into
shared forward passes. It is started with the `spawn` method (never `fork` a process that
may touch CUDA) and exits by itself when its parent dies, so a killed bot leaves no
orphan holding the GPU.

The bot imports this module (its `host_main` is the spawn target) and must not load
torch: the host's modules are imported inside `host_main`, in the child.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from typing import TYPE_CHECKING

from core.host.protocol import CancelBoard, EventSink, FatalEvent, HostConfig, JobSpec

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

PR_SET_PDEATHSIG = 1


def host_main(config: HostConfig, requests: Queue[JobSpec | None], events: EventSink,
              cancelled: CancelBoard) -> None:
    """Entry point of the child process."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s model-host: %(message)s")
    parent = os.getppid()
    _die_with_parent(parent)
    if config.nice:
        os.nice(config.nice)
    try:
        from core.host.steps import JobSteps  # noqa: PLC0415 - torch loads only in the spawned child

        steps = JobSteps(config, events, cancelled, parent)
        capacity = steps.boot()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        events.put(FatalEvent.of(exc))
        return
    if capacity > 1:
        from core.host.batching_host import BatchingHost  # noqa: PLC0415 - torch loads only in the spawned child

        BatchingHost(steps, capacity).serve(requests)
    else:
        from core.host.serial_host import SerialHost  # noqa: PLC0415 - torch loads only in the spawned child

        SerialHost(steps).serve(requests)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the bot dies, even mid-separation (Linux);
    elsewhere the host notices between segments and between jobs."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the bot died before the line above took effect
        os._exit(0)
