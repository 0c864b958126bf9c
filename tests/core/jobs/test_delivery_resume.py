"""A database error in the bot's delivery of a job does not leave the job `delivering` until
a restart: the sweeper's stale pass has the bot start the delivery again, and results that
already went out are never sent twice. The fault is real: the bot's SQLite database loses
its `jobs` table (renamed away by another connection, as a botched manual change or a
restore would) before the results are sent, or just after."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from core.db import sqlite_file
from core.host.handle import HostHandle
from core.jobs.dispatcher import Dispatcher
from core.jobs.embedded_execution import EmbeddedExecution
from core.jobs.job import JobState
from core.jobs.sweeper import Sweeper
from core.runtime import Runtime
from core.settings import Settings

STALE_S = 4.0  # the least STEMBOT_JOB_STALE_S: the bot retries a write for that long
STEMS = ("drums", "bass", "other", "vocals")
ARTIFACTS = {"files": {s: f"{s}.mp3" for s in STEMS}, "sizes": dict.fromkeys(STEMS, 1),
             "format": {"name": "mp3", "mp3_bitrate_kbps": 320, "opus_bitrate_kbps": 64, "wav_depth": "16"},
             "mode": "attach", "note": None, "preview": None}


def rename_table(database: Path, old: str, new: str) -> None:
    with sqlite3.connect(database, timeout=30) as db:
        db.execute(f"ALTER TABLE {old} RENAME TO {new}")


class Recorder:
    """The notifier's side (Discord, in the bot): what the user was sent. `after_send` runs
    once the results went out (the fault, in one test)."""

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self.after_send = lambda: None

    async def job_changed(self, job):
        return None

    async def deliver(self, job):
        self.delivered.append(job.id)
        self.after_send()

    async def job_ended(self, job):
        return None


@pytest.fixture
async def bot_side(sqlite_url, tmp_path):
    """A dispatcher and a sweeper as the bot wires them, on a real SQLite file, with one job
    whose stems are made (`delivering`)."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=sqlite_url, job_stale_s=STALE_S,
                        transient_retry_s=1)
    runtime = Runtime.from_settings(settings)
    recorder = Recorder()
    execution = EmbeddedExecution(HostHandle(runtime.host_config()))  # attached, never started
    dispatcher = Dispatcher(runtime.store, runtime.storage, recorder, execution, runtime.dispatcher_config("local"))
    sweeper = Sweeper(runtime.store, runtime.storage, 3600.0, stale_s=STALE_S)
    sweeper.on_recovered = dispatcher.recovered
    sweeper.resume_deliveries = dispatcher.resume_deliveries  # as bot/services.py wires it
    policy = await runtime.quotas.policy(None)
    job, refusal = await dispatcher.submit(policy, source_kind="url", source_url="https://example.com/a.mp3",
                                           source_name="a.mp3", model="tiny", stems="all", format="mp3", user_id=5)
    assert refusal is None and job is not None
    await runtime.store.claim_next("local")
    await runtime.store.reserve(job.id, 3.0)
    assert await runtime.store.transition(job.id, JobState.delivering, artifacts=ARTIFACTS, duration_s=3.0,
                                          progress=1.0)
    try:
        yield runtime, dispatcher, sweeper, recorder, await runtime.store.require(job.id)
    finally:
        await runtime.close()


async def done_after_a_pass(runtime, sweeper, job_id: int) -> None:
    """One stale pass of the sweeper, then the job is done within a few seconds."""
    await sweeper.recover_stale()
    async with asyncio.timeout(5):
        while (await runtime.store.require(job_id)).job_state is not JobState.done:
            await asyncio.sleep(0.1)


async def test_a_delivery_a_database_error_stopped_before_sending_is_resumed_once(bot_side, sqlite_url):
    runtime, dispatcher, sweeper, recorder, job = bot_side
    database = sqlite_file(sqlite_url)
    rename_table(database, "jobs", "jobs_away")
    try:
        await asyncio.wait([dispatcher.start_delivery(job)], timeout=10)
    finally:
        rename_table(database, "jobs_away", "jobs")
    assert recorder.delivered == []  # nothing went out
    assert (await runtime.store.require(job.id)).job_state is JobState.delivering

    await done_after_a_pass(runtime, sweeper, job.id)
    row = await runtime.store.require(job.id)
    assert row.delivered_at is not None and row.quota_state == "charged"
    await sweeper.recover_stale()
    assert recorder.delivered == [job.id]  # sent once


async def test_results_sent_before_a_database_error_are_not_sent_again(bot_side, sqlite_url):
    runtime, dispatcher, sweeper, recorder, job = bot_side
    database = sqlite_file(sqlite_url)
    # Right after the results go out the table goes away, for longer than the bot retries
    # writing the job's end: the delivery gives up with the job still `delivering`.
    recorder.after_send = lambda: rename_table(database, "jobs", "jobs_away")
    try:
        await asyncio.wait([dispatcher.start_delivery(job)], timeout=STALE_S + 10)
    finally:
        rename_table(database, "jobs_away", "jobs")
    assert recorder.delivered == [job.id]
    assert (await runtime.store.require(job.id)).job_state is JobState.delivering

    await done_after_a_pass(runtime, sweeper, job.id)
    assert recorder.delivered == [job.id]  # its end written, the results not sent again
    assert (await runtime.store.require(job.id)).delivered_at is not None
