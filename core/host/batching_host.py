"""A model host that runs several jobs at once on one device (a GPU), their segments
sharing forward passes."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from core.host.protocol import CancelledEvent, DoneEvent, JobSpec
from core.separation.batching import PassFailed, SegmentBatcher, TrackWork, out_of_memory
from core.separation.blockwise import BlockStitcher, StagedStems

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from core.host.steps import JobSteps, PreparedJob, Progress, Stems
    from core.separation.engine import TrackSeparation

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SeparatingJob:
    """A job in the shared passes: its track is the whole mix, or for a long track the
    block being separated (`blocks` stitches them together on disk)."""

    prepared: PreparedJob
    track: TrackSeparation | None
    progress: Progress
    started: float
    blocks: BlockStitcher | None = None

    @property
    def job(self) -> int:
        return self.prepared.spec.job_id

    @property
    def work(self) -> TrackWork:
        assert self.track is not None, "between blocks, a job is not in the passes"
        return self.track.work

    @property
    def fraction(self) -> float:
        work = self.work
        within = work.done / max(1, work.total)
        return self.blocks.fraction(within) if self.blocks is not None else min(within, 0.999)


class BatchingHost:
    """Several jobs at once on one device (a GPU): each is decoded and later encoded in a
    thread, while this process's main thread runs forward passes over the segments of
    all jobs being separated (core.separation.batching). A job joins the batches as soon as it is
    decoded and leaves them when its last segment is done or it is cancelled, so a short
    track never waits for a long one, and encoding overlaps the next separation.

    A long track (core.separation.blockwise) joins one block at a time: the next block starts when
    the last one's segments are done and its stems are on disk, so memory stays bounded
    by a block while its segments share passes with the other jobs'."""

    def __init__(self, steps: JobSteps, capacity: int):
        self.steps = steps
        self.capacity = capacity
        self.ready: queue.Queue[PreparedJob | None] = queue.Queue()  # decoded jobs for the main thread
        self.decoders = ThreadPoolExecutor(capacity, thread_name_prefix="decode")
        self.encoders = ThreadPoolExecutor(capacity, thread_name_prefix="encode")
        config = steps.config
        self.batcher = SegmentBatcher(steps.engine(config.model).device, config.batch_segments, config.precision)
        self.active: list[SeparatingJob] = []
        self.shared: dict[int, int] = {}  # job id -> most jobs in one forward pass with it
        self.stopping = False

    def serve(self, requests: Queue[JobSpec | None]) -> None:
        """Run the jobs that come until None and the running ones are done."""
        intake = threading.Thread(target=self._intake, args=(requests,), name="intake", daemon=True)
        intake.start()
        while not (self.stopping and not self.active and self.ready.empty()):
            if os.getppid() != self.steps.parent:
                os._exit(0)  # the bot is gone: nobody will read the results
            self._admit(block=not self.active)
            self._drop_cancelled()
            if self.active:
                self._step()
        self.decoders.shutdown(wait=True)
        self.encoders.shutdown(wait=True)

    def _intake(self, requests: Queue[JobSpec | None]) -> None:
        """Thread: new jobs go to the decoders; None means stop after the running ones."""
        while True:
            try:
                spec = requests.get(timeout=1.0)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                spec = None
            if spec is None:
                self.stopping = True
                self.ready.put(None)
                return
            self.decoders.submit(self.steps.guarded, spec.job_id, self._decode, spec)

    def _decode(self, spec: JobSpec) -> None:
        prepared = self.steps.prepare(spec)
        try:
            self.steps.stage(spec.job_id, "separating", duration_s=prepared.duration_s)
        except BaseException:
            prepared.cleanup()
            raise
        self.ready.put(prepared)

    def _admit(self, block: bool) -> None:
        """Take in the jobs decoded since the last pass (wait for one when idle)."""
        while True:
            try:
                prepared = self.ready.get(timeout=1.0) if block else self.ready.get_nowait()
            except queue.Empty:
                return
            block = False
            if prepared is not None:
                self.steps.guarded(prepared.spec.job_id, self._join, prepared)

    def _join(self, prepared: PreparedJob) -> None:
        if not getattr(prepared.engine, "shares_passes", True):
            self._alone(prepared)
            return
        blocks = None
        if prepared.staged is not None:
            assert prepared.work is not None and self.steps.config.block_s is not None  # staged: blocks are on
            blocks = BlockStitcher(prepared.staged, prepared.engine, prepared.request, self.steps.options(),
                                   prepared.work, self.steps.config.block_s)
        entry = SeparatingJob(prepared, None, self.steps.first_pass_progress(prepared),
                              time.monotonic(), blocks)
        try:
            self._next_track(entry)
        except BaseException:
            self._leave(entry)
            raise
        self.active.append(entry)

    def _alone(self, prepared: PreparedJob) -> None:
        """A job whose model cannot share the batcher's passes (a community checkpoint, #16):
        separated here, on its own, while the other jobs wait; then encoded as theirs are."""
        job = prepared.spec.job_id
        started = time.monotonic()
        try:
            stems, names = self.steps.separate_alone(prepared)
        except BaseException:
            prepared.cleanup()
            raise
        self.encoders.submit(self.steps.guarded, job, self._encode, prepared, stems, names,
                             time.monotonic() - started)

    def _next_track(self, entry: SeparatingJob) -> None:
        """Start the whole mix, or the next block of a long track."""
        prepared = entry.prepared
        options = self.steps.options()
        if entry.blocks is None:
            assert prepared.mix is not None
            entry.track = prepared.engine.start_track(prepared.mix, prepared.request, options)
            prepared.mix = None
        else:
            entry.track = prepared.engine.start_track(entry.blocks.audio(), prepared.request, options,
                                                      stats=entry.blocks.stats)

    def _drop_cancelled(self) -> None:
        for entry in list(self.active):
            if self.steps.is_cancelled(entry.job):
                self._leave(entry)
                self.steps.send(CancelledEvent(entry.job))

    def _leave(self, entry: SeparatingJob) -> None:
        """A job leaves before its end (cancelled or failed)."""
        if entry in self.active:
            self.active.remove(entry)
        if entry.blocks is not None:
            entry.blocks.close()
        entry.prepared.cleanup()
        self.shared.pop(entry.job, None)

    def _step(self) -> None:
        works = [entry.work for entry in self.active]
        try:
            advanced = self.batcher.step(works)
        except PassFailed as failure:
            self._recover(failure)
            return
        except Exception as exc:  # noqa: BLE001 - past the forward pass, a bug: these jobs fail, the host lives on
            for entry in list(self.active):
                self._leave(entry)
                self.steps.fail(entry.job, exc)
            return
        for entry in list(self.active):
            work = entry.work
            if work in advanced:
                self.shared[entry.job] = max(self.shared.get(entry.job, 1), len(advanced))
            if not work.finished:
                entry.progress(entry.fraction)
                continue
            self.active.remove(entry)
            # Back in the passes once its next block is read, or off to the encoders.
            self.steps.guarded(entry.job, self._track_done, entry)

    def _track_done(self, entry: SeparatingJob) -> None:
        assert entry.track is not None
        track_stems = entry.track.stems()
        stems: Stems = track_stems
        entry.track = None
        try:
            if entry.blocks is not None:
                entry.blocks.add(track_stems)
                if not entry.blocks.finished:
                    self._next_track(entry)
                    self.active.append(entry)
                    return
                stems = entry.blocks.result()
                assert entry.prepared.staged is not None
                entry.prepared.staged.path.unlink()
        except BaseException:
            self._leave(entry)
            raise
        entry.progress(1.0)
        names = stems.names if isinstance(stems, StagedStems) else list(stems)
        self.encoders.submit(self.steps.guarded, entry.job, self._encode, entry.prepared, stems, names,
                             time.monotonic() - entry.started)

    def _recover(self, failure: PassFailed) -> None:
        """A forward pass failed and its segments were given back: only the jobs to blame
        fail, the others go on."""
        if out_of_memory(failure.cause) and failure.segments > 1:
            # Too many segments at once for this device: fewer a pass from now on.
            self.batcher.batch_size = max(1, failure.segments // 2)
            log.warning("a forward pass over %d segments ran out of memory; %d segments a pass from now on",
                        failure.segments, self.batcher.batch_size)
            self.steps.free_device_memory()
            return
        if out_of_memory(failure.cause) or len(failure.works) == 1:
            for work in failure.works:
                self._fail_work(work, failure.cause)
            return
        # Something else: run each track's next segments alone to find the one(s) to blame.
        for work in failure.works:
            try:
                self.batcher.step([work])
            except PassFailed as alone:
                self._fail_work(work, alone.cause)

    def _fail_work(self, work: TrackWork, exc: Exception) -> None:
        for entry in self.active:
            if entry.work is work:
                self._leave(entry)
                self.steps.fail(entry.job, exc)
                return

    def _encode(self, prepared: PreparedJob, stems: Stems, names: list[str], separation_s: float) -> None:
        job = prepared.spec.job_id
        try:
            # A chain's second model runs here, on its own (its passes are not batched).
            started = time.monotonic()
            stems, names = self.steps.clean_pass(prepared, stems, names)
            separation_s += time.monotonic() - started
            self.steps.stage(job, "encoding")
            result = self.steps.finish(prepared, stems, names, separation_s)
        finally:
            prepared.cleanup()
        self.steps.send(DoneEvent(job, replace(result, batched_jobs=self.shared.pop(job, 1))))
