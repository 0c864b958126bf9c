"""The workers' own database role (`stembot db worker-role`), on a real PostgreSQL: logged
in as it, a worker does a worker's work and nothing else. It reads no interaction token,
no server policy, quota, tier or challenge, changes nothing about who asked for a job or
what was asked, adds no job, and sees no finished job's row.

Each "cannot" below passes only because the worker logs in as its own role: with the
bot's login (what every worker used before) every one of them fails."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from procrastinate.jobs import Status
from sqlalchemy.engine import make_url

from core.db import make_engine, make_sessions, upgrade, utcnow
from core.distributed.fleet import Fleet
from core.distributed.queue import QUEUE, JobQueue, conninfo, make_app
from core.distributed.queue_schema import install_schema
from core.distributed.worker_role import ensure_worker_role, reapply_worker_grants
from core.errors import TooLongError
from core.jobs.job import JobState
from core.jobs.quotas import Policy, QuotaBook
from core.jobs.runner import RunConfig, job_spec
from core.jobs.store import JobStore
from core.media.render import RenderOptions

TOKEN = "interaction-token-that-posts-as-the-bot"
POLICY = Policy(user_minutes_per_day=60, guild_minutes_per_day=600, user_concurrent_jobs=5, guild_queued_jobs=20,
                max_track_minutes=20)
FIELDS = dict(user_id=42, guild_id=7, channel_id=70, source_kind="attachment",
              source_url="https://cdn.example/private.mp3", model="tiny", stems="all", format="mp3")
# The bot's own tables, each with a column: a worker may do nothing at all with them.
BOTS_TABLES = {"interaction_tokens": "token", "guild_policies": "user_minutes_per_day",
               "role_tiers": "user_minutes_per_day", "quota_usage": "used_s", "quota_slots": "active",
               "challenges": "title", "challenge_entries": "user_id", "challenge_votes": "voter_id"}
# Columns of a job that say who asked and what, its quota, and what the bot set.
BOTS_COLUMNS = {"user_id": "1", "guild_id": "1", "channel_id": "1", "application_id": "1", "interaction_id": "1",
                "status_message_id": "1", "source_url": "'https://evil.example/'", "source_name": "'x.mp3'",
                "model": "'other'", "stems": "'vocals'", "format": "'wav'", "priority": "-9",
                "limits": "'{\"max_track_s\": 1e9}'", "slot_state": "'released'", "quota_state": "'charged'",
                "reserved_s": "0", "quota_day": "NULL", "cache_hit": "true", "input_sha256": "'x'",
                "transfer": "'{\"input_url\": \"http://169.254.169.254/\"}'", "queue_job_id": "1",
                "attachment_size_limit": "1", "cancel_requested": "false", "created_at": "now()",
                "started_at": "now()", "delivered_at": "now()", "artifacts_deleted_at": "now()",
                "render_options": "'{\"tempo\": 50}'"}


def worker_url_of(bot_url: str, role: str) -> str:
    return make_url(bot_url).set(username=role, password="worker-password").render_as_string(hide_password=False)


@pytest.fixture
def empty(postgres_server):
    from tests.support.postgres import reset_database

    reset_database(postgres_server)
    return postgres_server


@pytest.fixture
def migrated(empty):
    upgrade(empty)
    return empty


@pytest_asyncio.fixture
async def deployment(migrated):
    """A migrated database with the queue, the bot's data (jobs in several states, one asked
    through an interaction, a policy, a tier, quota usage, a challenge) and a worker role."""
    postgres_server = migrated
    await install_schema(postgres_server)
    role = f"worker_{uuid.uuid4().hex[:8]}"
    assert (await ensure_worker_role(postgres_server, role, "worker-password")).created
    engine = make_engine(postgres_server)
    sessions = make_sessions(engine)
    store = JobStore(sessions, QuotaBook(sessions, POLICY))
    running, _ = await store.admit(POLICY, **FIELDS, source_name="running.mp3", interaction_token=TOKEN,
                                   token_expires_at=utcnow() + timedelta(minutes=15), status_message_id=1)
    assert running is not None and await store.claim_next("bot") is not None
    await store.reserve(running.id, 30.0)
    await store.update(running.id, transfer={"input_url": "https://s3.example/in?X-Amz-Signature=s",
                                             "stems_post": {"url": "https://s3.example/", "fields": {}}})
    ids = {"running": running.id}
    for state in (JobState.queued, JobState.done, JobState.cancelled, JobState.failed):
        job = await store.create(**FIELDS, source_name=f"{state.value}.mp3")
        await store.update(job.id, state=state.value)
        ids[state.value] = job.id
    async with engine.begin() as connection:
        for sql in ("INSERT INTO guild_policies (guild_id, user_minutes_per_day) VALUES (7, 123.25)",
                    "INSERT INTO role_tiers (guild_id, role_id, user_minutes_per_day) VALUES (7, 8, 456.75)",
                    "INSERT INTO challenges (created_at, updated_at, guild_id, channel_id, host_id, title, rules, "
                    "source_name, stems, format, anonymous, submit_deadline, vote_deadline, state) VALUES (now(), "
                    "now(), 7, 70, 42, 'secret remix', '', '', 'all', 'mp3', false, now(), now(), 'open')"):
            await connection.exec_driver_sql(sql)
    yield {"bot": postgres_server, "worker": worker_url_of(postgres_server, role), "role": role, "ids": ids,
           "store": store}
    await engine.dispose()


async def as_worker(deployment: dict, sql: str, *params) -> list[tuple]:
    """Run `sql` logged in as the worker role; raises what PostgreSQL refuses."""
    async with await psycopg.AsyncConnection.connect(conninfo(deployment["worker"]), autocommit=True) as connection:
        cursor = await connection.execute(sql.encode(), params or None)
        return await cursor.fetchall() if cursor.description else [(cursor.rowcount,)]


async def everything_readable(deployment: dict) -> str:
    """Every value of every column of every table the worker can read, as one text."""
    async with await psycopg.AsyncConnection.connect(conninfo(deployment["bot"])) as connection:
        columns = await (await connection.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'")).fetchall()
    seen = []
    for table, column in columns:
        try:
            seen += [str(r[0]) for r in await as_worker(deployment, f'SELECT "{column}"::text FROM "{table}"')]
        except psycopg.errors.InsufficientPrivilege:
            continue
    return "\n".join(seen)


async def test_a_worker_reads_no_interaction_token_policy_tier_or_challenge(deployment):
    readable = await everything_readable(deployment)
    assert "running.mp3" in readable  # it does read what it needs
    for secret in (TOKEN, "cdn.example/private.mp3", "123.25", "456.75", "secret remix", "done.mp3", "cancelled.mp3"):
        assert secret not in readable, secret


async def test_a_worker_can_do_nothing_with_the_bots_tables(deployment):
    for table, column in BOTS_TABLES.items():
        for sql in (f"SELECT {column} FROM {table}", f"UPDATE {table} SET {column} = {column}",
                    f"DELETE FROM {table}", f"INSERT INTO {table} DEFAULT VALUES"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await as_worker(deployment, sql)
    # The schema's revision it may read (a worker checks it at start), never change.
    await as_worker(deployment, "SELECT version_num FROM alembic_version")
    for sql in ("UPDATE alembic_version SET version_num = 'x'", "DELETE FROM alembic_version",
                "INSERT INTO alembic_version VALUES ('x')"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await as_worker(deployment, sql)
    async with await psycopg.AsyncConnection.connect(conninfo(deployment["bot"])) as connection:
        policy = await (await connection.execute("SELECT user_minutes_per_day FROM guild_policies")).fetchall()
        tokens = await (await connection.execute("SELECT token FROM interaction_tokens")).fetchall()
    assert policy == [(123.25,)] and tokens == [(TOKEN,)]


async def test_a_worker_cannot_change_who_asked_what_was_asked_or_the_quota(deployment):
    running = deployment["ids"]["running"]
    for column, value in BOTS_COLUMNS.items():
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await as_worker(deployment, f"UPDATE jobs SET {column} = {value} WHERE id = {running}")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await as_worker(deployment, "INSERT INTO jobs (user_id, source_kind, source_url, source_name, model, stems, "
                                    "format) VALUES (1, 'url', 'u', 'n', 'tiny', 'all', 'mp3')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await as_worker(deployment, f"DELETE FROM jobs WHERE id = {running}")
    job = await deployment["store"].get(running)
    assert (job.user_id, job.guild_id, job.stems, job.model, job.quota_state, job.reserved_s) == (
        42, 7, "all", "tiny", "reserved", 30.0)


async def test_a_worker_sees_unfinished_and_failed_jobs_and_changes_only_running_ones(deployment):
    ids = deployment["ids"]
    seen = {r[0] for r in await as_worker(deployment, "SELECT id FROM jobs")}
    assert seen == {ids["running"], ids["queued"], ids["failed"]}  # never done or cancelled ones
    for other in ("queued", "done", "cancelled", "failed"):
        assert await as_worker(deployment, f"UPDATE jobs SET progress = 0.5 WHERE id = {ids[other]}") == [(0,)]
    # A running job goes only where a run takes it: not to done or cancelled.
    for state in ("done", "cancelled"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await as_worker(deployment, f"UPDATE jobs SET state = '{state}' WHERE id = {ids['running']}")
    assert (await deployment["store"].get(ids["done"])).progress == 0.0


async def test_a_worker_runs_a_job_with_its_role(deployment):
    """Everything `stembot worker` does in the database, through the same code, logged in
    as the role (the e2e tests in tests/stembot/test_distributed_e2e.py run the real one)."""
    running = deployment["ids"]["running"]
    bot_queue = JobQueue(deployment["bot"])
    await bot_queue.open()
    engine = make_engine(deployment["worker"])
    app = make_app(deployment["worker"])
    try:
        await bot_queue.enqueue(running, 0)
        async with app.open_async():
            worker_id = await app.job_manager.register_worker()
            await app.job_manager.update_heartbeat(worker_id)
            queued = await app.job_manager.fetch_job(queues=[QUEUE], worker_id=worker_id)
            assert queued is not None and queued.task_kwargs == {"job_id": running}

            sessions = make_sessions(engine)
            store, fleet = JobStore(sessions), Fleet(sessions)
            await fleet.beat("w/cpu", host="h", pid=1, device="cpu", model="tiny", state="ready", job_id=running)
            job, lease = await store.take(running, "w/cpu")
            assert job.transfer["input_url"].startswith("https://s3.example/") and job.limits["max_track_s"] == 1200
            with pytest.raises(TooLongError):
                await store.reserve(running, 3600.0)
            await store.reserve(running, 30.0)
            assert await store.transition(running, JobState.separating, lease=lease, duration_s=30.0)
            assert await store.update(running, lease=lease, in_state=JobState.separating, progress=0.5,
                                      heartbeat_at=utcnow())
            assert await store.transition(running, JobState.encoding, lease=lease)
            artifacts = {"files": {"vocals": "vocals.mp3"}, "sizes": {"vocals": 1}, "format": "mp3"}
            assert await store.transition(running, JobState.delivering, lease=lease, artifacts=artifacts,
                                          progress=1.0, separation_s=2.0)
            await app.job_manager.finish_job(queued, Status.SUCCEEDED, delete_job=False)

            # Another job: its model host crashes (back to the queue), then it fails.
            other = deployment["ids"]["queued"]
            assert (await deployment["store"].claim_next("bot")).id == other
            _, lease = await store.take(other, "w/cpu")
            assert await store.transition(other, JobState.queued, lease=lease, worker=None)
            assert (await deployment["store"].claim_next("bot")).id == other
            _, lease = await store.take(other, "w/cpu")
            assert await store.transition(other, JobState.failed, lease=lease, error="crashed", error_kind="x")
            assert await JobQueue(app=app).retry_stalled(30.0) == []  # every worker looks for stalled jobs
            await fleet.leave("w/cpu")
            await app.job_manager.unregister_worker(worker_id)
    finally:
        await engine.dispose()
        await bot_queue.close()
    done = await deployment["store"].get(running)
    assert (done.state, done.artifacts, done.progress, done.worker) == ("delivering", artifacts, 1.0, "w/cpu")
    assert (await deployment["store"].get(other)).attempts == 2


async def test_a_worker_reads_a_job_s_tempo_transpose_and_mix_and_hands_them_to_its_host(deployment):
    """In distributed mode the queue carries only "run job N": a request's render options
    reach the worker's model host through the row, read with the worker's own role."""
    options = RenderOptions(tempo=80, transpose=-2, mix=(("bass", 100), ("vocals", 50)))
    queued = deployment["ids"]["queued"]
    await deployment["store"].update(queued, render_options=options.to_column())
    assert (await deployment["store"].claim_next("bot")).id == queued
    engine = make_engine(deployment["worker"])
    try:
        job, _ = await JobStore(make_sessions(engine)).take(queued, "w/cpu")
        spec = job_spec(job, Path("/in/song.mp3"), Path("/jobs/1/stems"), RunConfig())
    finally:
        await engine.dispose()
    assert RenderOptions.from_column(spec.render) == options
    assert (spec.stems, spec.format, spec.model) == ("all", "mp3", "tiny")


def stembot(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STEMBOT_"))}
    return subprocess.run([sys.executable, "-m", "stembot", *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


def test_the_command_refuses_sqlite(tmp_path):
    result = stembot("db", "worker-role", "workers", STEMBOT_DATA_DIR=str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is for PostgreSQL" in result.stderr and "SQLite" in result.stderr


async def test_the_command_makes_a_role_prints_its_url_once_and_upgrade_regrants_it(empty):
    postgres_server = empty
    role = f"worker_{uuid.uuid4().hex[:8]}"
    env = {"STEMBOT_DATABASE_URL": postgres_server}
    made = stembot("db", "worker-role", role, **env)
    assert made.returncode == 0, made.stderr
    line = next(x for x in made.stdout.splitlines() if x.startswith("STEMBOT_DATABASE_URL="))
    url = make_url(line.removeprefix("STEMBOT_DATABASE_URL="))
    assert url.username == role and len(url.password or "") >= 24
    assert url.password not in made.stderr and made.stdout.count(url.password) == 1
    # Kept on the server as a hash only.
    async with await psycopg.AsyncConnection.connect(conninfo(postgres_server)) as connection:
        stored = await (await connection.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                                                 [role])).fetchone()
    assert stored[0].startswith(("SCRAM-SHA-256$", "md5")) and url.password not in stored[0]

    again = stembot("db", "worker-role", role, **env)
    assert again.returncode == 0 and "updated" in again.stdout and url.password not in again.stdout

    # A migration that adds a column a run reads: `stembot db upgrade` grants it again.
    deployment = {"bot": postgres_server, "worker": url.render_as_string(hide_password=False)}
    async with await psycopg.AsyncConnection.connect(conninfo(postgres_server)) as connection:
        await connection.execute(f'REVOKE SELECT (model) ON jobs FROM "{role}"'.encode())
        await connection.commit()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await as_worker(deployment, "SELECT model FROM jobs")
    upgraded = stembot("db", "upgrade", **env)
    assert upgraded.returncode == 0 and role in upgraded.stderr
    assert await as_worker(deployment, "SELECT model FROM jobs") == []
    assert role in await reapply_worker_grants(postgres_server)


def test_the_command_refuses_the_bots_own_login_and_odd_names(empty):
    postgres_server = empty
    bot_login = make_url(postgres_server).username
    env = {"STEMBOT_DATABASE_URL": postgres_server}
    for name, why in ((bot_login, "the login this command runs as"), ("Robert'); DROP", "not a plain role name")):
        result = stembot("db", "worker-role", name, **env)
        assert result.returncode == 1 and why in result.stderr and "Traceback" not in result.stderr, result.stderr

