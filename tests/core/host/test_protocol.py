"""core.host.protocol: the host's events cross a real `spawn` queue intact and say failures in words."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from core.errors import BadRequestError
from core.host.protocol import (
    CancelledEvent,
    DiedEvent,
    DoneEvent,
    FailedEvent,
    FatalEvent,
    JobResult,
    ProgressEvent,
    ReadyEvent,
    StageEvent,
)

RESULT = JobResult(files={"vocals": "vocals.flac"}, sizes={"vocals": 1234}, duration_s=4.0, separation_s=1.5,
                   format={"name": "flac", "mp3_bitrate_kbps": 320}, mode="attach", note=None,
                   preview="preview.png", batched_jobs=2)

EVENTS = [
    ReadyEvent(model="tiny", device="cpu", pid=42, load_s=0.5, warmup_s=0.25, capacity=1),
    FatalEvent(reason="no model named x", kind="bad_request"),
    StageEvent(job=1, stage="separating", duration_s=4.0),
    StageEvent(job=1, stage="encoding"),
    ProgressEvent(job=1, fraction=0.5),
    DoneEvent(job=1, result=RESULT),
    FailedEvent(job=2, reason="not audio", kind="not_audio"),
    CancelledEvent(job=3),
    DiedEvent(exitcode=-9),
]


def test_every_event_crosses_a_spawn_queue_unchanged():
    events = mp.get_context("spawn").Queue()
    try:
        for event in EVENTS:
            events.put(event)
        received = [events.get(timeout=10) for _ in EVENTS]
    finally:
        events.close()
        events.join_thread()
    assert received == EVENTS
    assert [type(event) for event in received] == [type(event) for event in EVENTS]


def test_events_are_frozen():
    with pytest.raises(AttributeError):
        CancelledEvent(job=3).job = 4  # type: ignore[misc]


def test_artifacts_are_what_the_job_row_keeps():
    assert RESULT.artifacts() == {"files": {"vocals": "vocals.flac"}, "sizes": {"vocals": 1234},
                                  "format": {"name": "flac", "mp3_bitrate_kbps": 320}, "mode": "attach",
                                  "note": None, "preview": "preview.png"}


def test_a_failure_is_said_in_words_and_a_bug_hides_its_internals():
    assert FailedEvent.of(5, BadRequestError("no stem named kazoo")) == FailedEvent(5, "no stem named kazoo",
                                                                                    "bad_request")
    assert FailedEvent.of(5, KeyError("secret")) == FailedEvent(5, "internal error (KeyError)", "error")
    assert FatalEvent.of(RuntimeError("boom")) == FatalEvent("internal error (RuntimeError)", "error")
