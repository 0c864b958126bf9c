"""Distributed mode end to end: the object store down for 60 s with 20 jobs queued (issue
#15's outage). The fault is real: the bot, and so every presigned URL it gives the worker,
reaches moto through a loopback proxy that cuts every connection and answers 503
ServiceUnavailable while "S3" is down. Every call waiting on the store is tried again with
backoff (STEMBOT_TRANSIENT_RETRY_S, default 5 minutes), no new job is started into the
outage, /readyz says "storage" false meanwhile: no job is lost or failed, none is delivered
twice, every user gets one answer, and all 20 are done once the store is back. (Transfers
of a worker cut off mid-job: tests/core/storage/test_s3_outage.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.bot.conftest import BotProcess
from tests.bot.helpers import final_message
from tests.stembot import test_distributed_e2e as set_up
from tests.stembot.test_distributed_e2e import WorkerProcess, query, ready_slots, song, wait_until
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.s3 import OutageProxy

# A bot and workers on a fresh database and bucket, as the distributed tests set them up.
distributed = set_up.distributed

pytestmark = pytest.mark.slow

JOBS = 20
OUTAGE_S = 60.0


async def readiness(bot: BotProcess) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"{bot.ops_url}/readyz") as response:
        return response.status, await response.json()


def failures(fake, interactions) -> list:
    return [m.content for i in interactions for m in fake.messages_for(i) if "Couldn't split" in m.content]


async def test_s3_down_60_s_with_20_jobs_queued_no_job_lost_none_twice(distributed, s3_server, tmp_path):
    url = distributed["url"]
    worker = WorkerProcess(distributed, "w")
    loop = asyncio.get_running_loop()
    async with FakeDiscord() as fake, OutageProxy(s3_server.endpoint_url) as proxy:
        bot = BotProcess(fake, tmp_path / "bot", Path(distributed["worker"]["STEMBOT_MODEL_DIR"]),
                         **{**distributed["bot"], "STEMBOT_S3_ENDPOINT_URL": proxy.endpoint})
        try:
            await worker.start()
            await ready_slots(url, 1)
            await bot.start()

            async def ready() -> bool:
                return (await readiness(bot))[0] == 200
            # The outage starts once the bot has finished starting up, and the fake Discord
            # gives the answers more than its 3 s: this test is about the store, and a fresh-
            # clone run on a loaded machine once saw the first of the 20 answered too late
            # (the job was cancelled as never answered). Answers in time: test_slow_answers_e2e.
            await wait_until(ready, 60, "the bot ready, storage included")
            fake.callback_deadline_s = 15.0
            proxy.down()
            back_at = loop.time() + OUTAGE_S
            interactions = []
            for i in range(JOBS):
                attachment = attachment_option("file", song(fake, tmp_path, f"song{i}.wav", 2.0))
                interactions.append(await fake.send_slash_command("split", [attachment],
                                                                  user=fake.make_user(f"member{i}")))
            storage_false = False
            while loop.time() < back_at:
                code, body = await readiness(bot)
                storage_false |= code == 503 and body["checks"].get("storage") is False
                assert not failures(fake, interactions), "a job failed during the outage"
                await asyncio.sleep(1.0)
            rows = await query(url, "SELECT state, queue_job_id FROM jobs ORDER BY id")
            states = [r.state for r in rows]
            proxy.up()
            assert proxy.refused > 0
            assert "failed" not in states, f"jobs failed (some untold) during the outage: {states}"
            # No job started into the outage: none reached a worker's queue; those the bot was
            # handing over wait in `fetching` (two, slot and prefetch, on an idle machine; a
            # fresh-clone run under load once found 16 of the 20 queued).
            assert len(states) == JOBS and set(states) <= {"queued", "fetching"}, states
            assert all(r.queue_job_id is None for r in rows), rows
            assert states.count("queued") >= JOBS // 2, states
            assert storage_false, "/readyz never said the storage was down"

            for interaction in interactions:
                await final_message(fake, interaction, timeout=180)
            await asyncio.sleep(2)  # time for a second delivery, were there one
            assert not failures(fake, interactions)
            for interaction in interactions:
                assert sum("Done" in m.content for m in fake.messages_for(interaction)) == 1, \
                    fake.messages_for(interaction)
            rows = await query(url, "SELECT id, state, error FROM jobs ORDER BY id")
            assert [r.state for r in rows] == ["done"] * JOBS, rows
            code, body = await readiness(bot)
            assert code == 200 and body["checks"]["storage"] is True, body
        finally:
            await bot.stop()
            await worker.stop()
