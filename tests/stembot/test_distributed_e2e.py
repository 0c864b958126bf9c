"""Distributed mode end to end: the real `stembot run` bot and `stembot worker` processes
against a throwaway PostgreSQL (database and queue), a moto S3 server and the fake
Discord, with a tiny model on the CPU. Workers get no storage credentials, and log in to
the database as the workers' own role (`stembot db worker-role`), which has only what a
worker needs (tests/core/distributed/test_worker_role.py shows what it cannot do)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.bot.conftest import BotProcess
from tests.bot.helpers import final_message
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import music

pytestmark = pytest.mark.slow

STALE_S = "6"


@pytest.fixture
def distributed(postgres_server, s3_server, model_dir, tmp_path):
    """Environment of a distributed set-up on a fresh database and bucket, migrated the
    way an operator does it (`stembot db upgrade`), the workers logging in as the role
    `stembot db worker-role` made for them, with the URL it printed."""
    from tests.support.postgres import reset_database

    reset_database(postgres_server)
    common = {
        "STEMBOT_QUEUE": "postgres",
        "STEMBOT_DATABASE_URL": postgres_server,
        "STEMBOT_MODEL": "tiny",
        "STEMBOT_MODEL_DIR": str(model_dir),
        "STEMBOT_SHIFTS": "0",
        "STEMBOT_DEVICE": "cpu",
        "STEMBOT_WORKER_STALE_S": STALE_S,
        "STEMBOT_THREADS": "1",  # two workers share this machine's cores
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STEMBOT_"))}
    upgraded = subprocess.run([sys.executable, "-m", "stembot", "db", "upgrade"], env={**clean, **common},
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr
    role = subprocess.run([sys.executable, "-m", "stembot", "db", "worker-role", f"worker_{uuid.uuid4().hex[:8]}"],
                          env={**clean, **common}, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert role.returncode == 0, role.stderr
    worker_url = next(line for line in role.stdout.splitlines() if line.startswith("STEMBOT_DATABASE_URL="))
    worker_env = {**common, "STEMBOT_DATABASE_URL": worker_url.removeprefix("STEMBOT_DATABASE_URL=")}
    assert worker_env["STEMBOT_DATABASE_URL"] != postgres_server
    bot_env = {
        **common,
        "STEMBOT_S3_BUCKET": s3_server.bucket,
        "STEMBOT_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key,
    }
    return {"clean": clean, "worker": worker_env, "bot": bot_env, "url": postgres_server, "root": tmp_path}


class WorkerProcess:
    def __init__(self, setup: dict, name: str):
        self.name = name
        self.env = {**setup["clean"], **setup["worker"], "STEMBOT_WORKER_NAME": name,
                    "STEMBOT_DATA_DIR": str(setup["root"] / name), "PYTHONUNBUFFERED": "1"}
        self.log = setup["root"] / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        out = open(self.log, "ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stembot", "worker", env=self.env, stdout=out, stderr=out,
            start_new_session=True)
        out.close()

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """kill -9 the worker and its model host, as a crashed machine would."""
        if self.process and self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except TimeoutError:
                self.kill()


async def query(url: str, sql: str, **params) -> list:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return (await connection.execute(text(sql), params)).all()
    finally:
        await engine.dispose()


async def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


async def ready_slots(url: str, count: int, timeout: float = 90.0) -> None:
    async def check():
        rows = await query(url, "SELECT name FROM worker_slots WHERE state = 'ready'")
        return len(rows) >= count
    await wait_until(check, timeout, f"{count} ready worker slot(s)")


def song(fake: FakeDiscord, tmp_path: Path, name: str, seconds: float) -> dict:
    path = music(tmp_path / name, seconds=seconds, tone=random.uniform(200.0, 900.0))
    return fake.add_attachment(name, path.read_bytes(), content_type="audio/wav")


def done(messages) -> list:
    return [m for m in messages if "Done" in m.content]


async def test_two_workers_share_the_queue_and_a_killed_workers_job_finishes_on_the_other(
        distributed, tmp_path):
    url = distributed["url"]
    workers = [WorkerProcess(distributed, "w1"), WorkerProcess(distributed, "w2")]
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", Path(distributed["worker"]["STEMBOT_MODEL_DIR"]),
                         **distributed["bot"])
        try:
            for worker in workers:
                await worker.start()
            await ready_slots(url, 2)
            await bot.start()
            users = [fake.make_user(f"member{i}") for i in range(4)]
            interactions = []
            for i, user in enumerate(users):
                att = song(fake, tmp_path, f"song{i}.wav", seconds=60.0)
                # The last one's stems are too large for its channel: presigned download links.
                limit = {"attachment_size_limit": 100 * 1024} if i == len(users) - 1 else {}
                interactions.append(await fake.send_slash_command("split", [attachment_option("file", att)],
                                                                  user=user, **limit))

            # Both workers busy at once: the queue feeds every ready slot.
            async def two_running():
                rows = await query(url, "SELECT id, worker FROM jobs WHERE state = 'separating'")
                return rows if len({w for _, w in rows}) == 2 else None
            running = await wait_until(two_running, 120, "both workers separating")
            victim_job, victim_slot = running[0]
            victim = next(w for w in workers if victim_slot.startswith(w.name + "/"))
            victim.kill()
            survivor = next(w for w in workers if w is not victim)

            for interaction in interactions:
                await final_message(fake, interaction, timeout=240)
            for interaction in interactions:
                results = done(fake.messages_for(interaction))
                assert len(results) == 1, fake.messages_for(interaction)
            for interaction in interactions[:-1]:
                # Four stems and the waveform preview.
                assert len(done(fake.messages_for(interaction))[0].attachments) == 5
            linked = done(fake.messages_for(interactions[-1]))[0]
            links = {c["label"]: c["url"] for row in linked.components for c in row.get("components", [])
                     if c.get("url")}
            assert len(links) == 4 and all("X-Amz-Signature=" in url for url in links.values())
            async with aiohttp.ClientSession() as session:
                async with session.get(next(iter(links.values()))) as response:
                    assert response.status == 200 and len(await response.read()) > 100 * 1024
            assert len(done(fake.channel_messages(fake.channel_id))) == len(interactions)

            async def all_done():
                # The row says `done` just after the message is sent.
                rows = await query(url, "SELECT id, state, attempts, worker, transfer FROM jobs ORDER BY id")
                return rows if [r.state for r in rows] == ["done"] * 4 else None
            rows = await wait_until(all_done, 10, "every job to be done")
            assert all(r.transfer is None for r in rows)  # no presigned URL kept after the end
            taken_over = next(r for r in rows if r.id == victim_job)
            assert taken_over.attempts == 2 and taken_over.worker.startswith(survivor.name + "/")
            # Every job ran to completion exactly once.
            finished = [line for w in workers for line in w.read_log().splitlines() if ": delivering" in line]
            assert sorted(int(line.split("job ")[1].split()[0]) for line in finished) == [r.id for r in rows]
            assert await query(url, "SELECT id FROM procrastinate_jobs WHERE status IN ('todo', 'doing')") == []
            # The workers never had storage credentials.
            assert all("AWS_SECRET_ACCESS_KEY" not in w.env for w in workers)
        finally:
            await bot.stop()
            for worker in workers:
                await worker.stop()


async def test_cancel_reaches_the_worker_and_sigterm_drains(distributed, tmp_path):
    url = distributed["url"]
    worker = WorkerProcess(distributed, "solo")
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", Path(distributed["worker"]["STEMBOT_MODEL_DIR"]),
                         **distributed["bot"])
        try:
            await worker.start()
            await ready_slots(url, 1)
            await bot.start()

            # A user cancels while the worker separates: the worker stops within seconds.
            canceller = fake.make_user("canceller")
            first = await fake.send_slash_command(
                "split", [attachment_option("file", song(fake, tmp_path, "long.wav", 90.0))], user=canceller)

            async def separating():
                rows = await query(url, "SELECT id FROM jobs WHERE state = 'separating'")
                return rows[0].id if rows else None
            job_id = await wait_until(separating, 120, "the separation to start")
            await fake.send_slash_command("cancel", [{"type": 4, "name": "job", "value": job_id}], user=canceller)
            loop = asyncio.get_running_loop()
            asked = loop.time()
            result = await final_message(fake, first, timeout=30)
            assert "Cancelled" in result.content

            async def idle():
                rows = await query(url, "SELECT job_id FROM worker_slots")
                return rows and rows[0].job_id is None

            async def aborted():
                # The slot's row may read idle before its first beat with the job (a loaded
                # machine): the worker's own word that it dropped the job is what counts.
                return "aborted" in worker.read_log()
            await wait_until(aborted, 15, "the worker to abort the cancelled job")
            await wait_until(idle, 20, "the worker to drop the cancelled job")
            assert loop.time() - asked < 15

            # SIGTERM while separating: the running job is finished, the queued one is left
            # for another worker, and the worker exits cleanly.
            users = [fake.make_user("drain-a"), fake.make_user("drain-b")]
            running = await fake.send_slash_command(
                "split", [attachment_option("file", song(fake, tmp_path, "a.wav", 60.0))], user=users[0])
            job_a = await wait_until(separating, 120, "the next separation")
            waiting = await fake.send_slash_command(
                "split", [attachment_option("file", song(fake, tmp_path, "b.wav", 20.0))], user=users[1])
            worker.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.process.wait(), 120) == 0
            finished = await query(url, "SELECT state FROM jobs WHERE id = :a", a=job_a)
            assert finished[0].state in ("delivering", "done"), "the running job must finish before the worker exits"
            await final_message(fake, running, timeout=30)
            assert done(fake.messages_for(running))
            rows = await query(url, "SELECT id, state FROM jobs WHERE id > :a ORDER BY id", a=job_a)
            assert [r.state for r in rows] == ["queued"], "a draining worker takes no new job"

            # Another worker picks the waiting job up.
            second = WorkerProcess(distributed, "next")
            await second.start()
            try:
                assert done([await final_message(fake, waiting, timeout=120)])
            finally:
                await second.stop()
        finally:
            await bot.stop()
            await worker.stop()


def test_worker_refuses_without_the_postgres_queue(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STEMBOT_"))}
    result = subprocess.run([sys.executable, "-m", "stembot", "worker"],
                            env={**clean, "STEMBOT_DATA_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "STEMBOT_QUEUE=postgres" in result.stderr and "Traceback" not in result.stderr


async def test_worker_with_a_missing_model_fails_fast_and_leaves_no_slot(distributed, tmp_path):
    worker = WorkerProcess(distributed, "nomodel")
    worker.env["STEMBOT_MODEL"] = "no_such_model"
    await worker.start()
    code = await asyncio.wait_for(worker.process.wait(), 60)
    log = worker.read_log()
    assert code == 1 and "no_such_model" in log and "Traceback" not in log, log
    assert await query(distributed["url"], "SELECT name FROM worker_slots") == []


async def rename_table(url: str, old: str, new: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))
    finally:
        await engine.dispose()


async def test_a_database_error_during_a_workers_separation_costs_no_job(distributed, tmp_path):
    """The fault is real: the `jobs` table renamed away in PostgreSQL for a few seconds (a
    botched manual change, a restore), so the worker's progress, heartbeat and stage writes
    fail with "relation does not exist"; the queue's own tables stay, so procrastinate goes
    on. The job must still end done, its user answered once, its slot free."""
    url = distributed["url"]
    worker = WorkerProcess(distributed, "solo")
    async with FakeDiscord() as fake:
        bot = BotProcess(fake, tmp_path / "bot", Path(distributed["worker"]["STEMBOT_MODEL_DIR"]),
                         **distributed["bot"])
        try:
            await worker.start()
            await ready_slots(url, 1)
            await bot.start()
            interaction = await fake.send_slash_command(
                "split", [attachment_option("file", song(fake, tmp_path, "long.wav", 60.0))])

            async def separating():
                rows = await query(url, "SELECT id FROM jobs WHERE state = 'separating'")
                return rows[0].id if rows else None
            job_id = await wait_until(separating, 120, "the separation to start")
            await rename_table(url, "jobs", "jobs_away")
            try:
                await asyncio.sleep(5.0)  # progress is written every 2 s: some writes fail
            finally:
                await rename_table(url, "jobs_away", "jobs")
            result = await final_message(fake, interaction, timeout=180)
            assert "Done" in result.content, result.content
            await asyncio.sleep(1.0)  # time for a second answer, were one coming
            assert len(done(fake.messages_for(interaction))) == 1
            assert not [m for m in fake.channel_messages(fake.channel_id)
                        if "long.wav" in m.content and m.id != result.id]
            rows = await query(url, "SELECT state, attempts, slot_state, quota_state FROM jobs WHERE id = :id",
                               id=job_id)
            assert [tuple(r) for r in rows] == [("done", 1, "released", "charged")]
            assert "progress not written" in worker.read_log()
        finally:
            await bot.stop()
            await worker.stop()
