"""`stembot jobs list|show|retry|fail` as an operator runs them, on the bot's SQLite database."""

from __future__ import annotations

import os

import pytest
import pytest_asyncio
from sqlalchemy import select

from core.db import make_engine, make_sessions, upgrade
from core.jobs.job import JobState
from core.jobs.quotas import Policy, QuotaBook, QuotaSlot
from core.jobs.store import JobStore
from core.ops.bot_lock import BotLock
from tests.stembot.test_cli_bot import _stembot

TOKEN = "interaction-token-SECRET"
SIGNED = "https://cdn.discordapp.com/attachments/1/2/song.mp3?ex=1&hm=SIGNATURE"
PRESIGNED = "https://s3.example/jobs/1/input?X-Amz-Signature=PRESIGNED"
POLICY = Policy(user_minutes_per_day=60, guild_minutes_per_day=600, user_concurrent_jobs=2,
                guild_queued_jobs=20, max_track_minutes=20)


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMBOT_")}
    return {**env, "STEMBOT_DATA_DIR": str(tmp_path / "data"), **extra}


@pytest.fixture
def database(tmp_path):
    (tmp_path / "data").mkdir()
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'stembot.sqlite3'}"
    upgrade(url)
    return url


class Jobs:
    """The bot's store on the test's database, to set jobs up and look at them."""

    def __init__(self, url: str):
        self.engine = make_engine(url)
        sessions = make_sessions(self.engine)
        self.store = JobStore(sessions, QuotaBook(sessions, POLICY))

    async def admit(self, user_id: int = 7, **fields):
        job, refusal = await self.store.admit(
            POLICY, source_kind="attachment", source_url=SIGNED, source_name="song.mp3", model="htdemucs",
            stems="vocals", format="mp3", user_id=user_id, guild_id=42, interaction_token=TOKEN, status_message_id=555,
            **fields)
        assert refusal is None
        return job

    async def slots(self) -> dict[tuple[int, int], int]:
        async with self.store.sessions() as session:
            return {(s.guild_id, s.user_id): s.active for s in await session.scalars(select(QuotaSlot))}


@pytest_asyncio.fixture
async def jobs(database):
    jobs = Jobs(database)
    yield jobs
    await jobs.engine.dispose()


async def test_list_and_show_never_print_secrets(tmp_path, jobs):
    first = await jobs.admit(user_id=1)
    second = await jobs.admit(user_id=2)
    await jobs.store.claim_next("bot")
    await jobs.store.update(first.id, transfer={"input_url": PRESIGNED})
    assert await jobs.store.fail_by_operator(second.id, "the model host crashed\nwith a long story")

    code, out, err = await _stembot("jobs", "list", env=_env(tmp_path), cwd=tmp_path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "AGE"]
    assert [line.split()[:2] for line in lines[1:]] == [[str(second.id), "failed"], [str(first.id), "fetching"]]
    assert "the model host crashed with a long" in lines[1] and "htdemucs" in lines[2]
    code, out, err = await _stembot("jobs", "list", "--state", "failed", "--limit", "5", env=_env(tmp_path),
                                    cwd=tmp_path)
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:]] == [str(second.id)]

    code, out, err = await _stembot("jobs", "show", str(first.id), env=_env(tmp_path), cwd=tmp_path)
    assert code == 0, err
    assert "interaction token:  present" in out and "transfer URLs:      present" in out
    assert "song.mp3 (query hidden)" in out and "state:              fetching" in out
    for output in (out, err):
        assert TOKEN not in output and "SIGNATURE" not in output and "PRESIGNED" not in output


async def test_bad_input_gets_a_short_refusal(tmp_path, jobs):
    job = await jobs.admit()
    for args, message in [
        (("show", "999"), "error: no job 999"),
        (("retry", "999"), "error: no job 999"),
        (("fail", "999"), "error: no job 999"),
        (("retry", str(job.id)), f"error: job {job.id} is queued: only a failed job, or one in a running state"),
    ]:
        code, out, err = await _stembot("jobs", *args, env=_env(tmp_path), cwd=tmp_path)
        assert (code, out) == (1, ""), (args, err)
        assert err.startswith(message) and "Traceback" not in err, (args, err)
    code, out, err = await _stembot("jobs", "list", "--state", "stuck", env=_env(tmp_path), cwd=tmp_path)
    assert code == 2 and "invalid choice: 'stuck'" in err


async def test_fail_then_retry_then_a_finished_job_is_refused(tmp_path, jobs):
    job = await jobs.admit()
    await jobs.store.claim_next("bot")
    files = tmp_path / "data" / "jobs" / str(job.id)
    files.mkdir(parents=True)
    (files / "input.mp3").write_bytes(b"audio")

    code, out, err = await _stembot("jobs", "fail", str(job.id), env=_env(tmp_path), cwd=tmp_path)
    assert code == 0, err
    assert f"job {job.id}: fetching -> failed (stopped by the operator)" in out
    failed = await jobs.store.get(job.id)
    assert (failed.job_state, failed.error, failed.slot_state) == (JobState.failed, "stopped by the operator",
                                                                   "released")
    assert not files.exists()
    assert await jobs.slots() == {(42, 7): 0, (42, 0): 0}

    code, out, err = await _stembot("jobs", "fail", str(job.id), "--reason", "again", env=_env(tmp_path),
                                    cwd=tmp_path)
    assert code == 1 and err.startswith(f"error: job {job.id} is failed already")

    code, out, err = await _stembot("jobs", "retry", str(job.id), env=_env(tmp_path), cwd=tmp_path)
    assert code == 0, err
    assert f"job {job.id}: failed -> queued (attempts so far: 1)" in out
    assert (await jobs.store.get(job.id)).job_state is JobState.queued
    assert await jobs.slots() == {(42, 7): 1, (42, 0): 1}

    code, out, err = await _stembot("jobs", "fail", str(job.id), "--reason", "bad file", env=_env(tmp_path),
                                    cwd=tmp_path)
    assert code == 0, err
    assert (await jobs.store.get(job.id)).error == "bad file"
    assert await jobs.slots() == {(42, 7): 0, (42, 0): 0}


async def test_embedded_bot_running_fail_and_running_retry_are_refused(tmp_path, database, jobs):
    queued = await jobs.admit(user_id=1)
    running = await jobs.admit(user_id=2)
    await jobs.store.claim_next("bot")  # the first in fair order
    running, queued = sorted([await jobs.store.get(queued.id), await jobs.store.get(running.id)],
                             key=lambda j: j.job_state is JobState.queued)
    assert running.job_state is JobState.fetching

    async with BotLock(database):  # a bot runs on this database, in embedded mode
        code, out, err = await _stembot("jobs", "fail", str(queued.id), env=_env(tmp_path), cwd=tmp_path)
        assert code == 1 and "a bot is running on this database in embedded mode" in err, err
        code, out, err = await _stembot("jobs", "retry", str(running.id), env=_env(tmp_path), cwd=tmp_path)
        assert code == 1 and "restart the bot instead" in err, err
    assert (await jobs.store.get(queued.id)).job_state is JobState.queued
    assert (await jobs.store.get(running.id)).job_state is JobState.fetching

    code, out, err = await _stembot("jobs", "retry", str(running.id), env=_env(tmp_path), cwd=tmp_path)
    assert code == 0, err
    assert (await jobs.store.get(running.id)).job_state is JobState.queued
