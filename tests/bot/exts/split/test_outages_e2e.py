"""End to end: Discord answering 503 to every upload for 90 s (issue #15's outage) does not
fail the job. Its delivery waits, tried again with backoff within STEMBOT_TRANSIENT_RETRY_S,
/readyz says "deliveries" false meanwhile, and the stems go out once when Discord is back;
the job queued behind it is not started into the outage, and is delivered after. An outage
longer than the budget fails the job with a short message, uncharged, told once."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import aiohttp
import pytest
import pytest_asyncio

from tests.bot.conftest import BotProcess
from tests.bot.helpers import final_message, upload
from tests.support.fake_discord import attachment_option

pytestmark = pytest.mark.asyncio(loop_scope="module")

OUTAGE_S = 90.0


async def readiness(bot: BotProcess) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"{bot.ops_url}/readyz") as response:
        return response.status, await response.json()


def uploads_of(fake, interaction) -> list:
    """The requests that carried the job's stems through its interaction token."""
    return [r for r in fake.requests if r.files and f"/{interaction.token}/" in r.path]


@pytest_asyncio.fixture(loop_scope="module")
async def bot(fake, model_dir, tmp_path, request):
    """A bot of its own per test (its settings differ), the upload outage over after it."""
    process = BotProcess(fake, tmp_path / "data", model_dir, **getattr(request, "param", {}))
    await process.start()
    try:
        yield process
    finally:
        fake.log.upload_outage = None
        await process.stop()


async def test_discord_503_on_uploads_for_90_s_the_job_is_delivered_once_after(fake, bot, tmp_path):
    outage = fake.fail_uploads_for(OUTAGE_S, status=503)
    first = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, seconds=3.0))],
                                          user=fake.make_user("first"))
    await fake.wait_for(lambda: outage.answered > 0, timeout=60, what="the first refused upload")
    second = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, seconds=3.0))],
                                           user=fake.make_user("second"))

    # discord.py tries 5 times (25 s) before the delivery sees the error; then the bot holds back.
    deadline = time.monotonic() + 45
    while True:
        code, body = await readiness(bot)
        if code == 503 and body["checks"].get("deliveries") is False:
            break
        assert time.monotonic() < deadline, f"/readyz never said deliveries are held back: {body}"
        await asyncio.sleep(0.5)
    assert body["checks"]["dispatcher"] is True
    assert not any("Couldn't split" in m.content for m in fake.messages_for(first))
    assert not any("Separating" in m.content or "Done" in m.content for m in fake.messages_for(second)), \
        "no job is started into the outage"

    result = await final_message(fake, first, timeout=OUTAGE_S + 60)
    assert "Done" in result.content, result.content
    assert len(result.attachments) == 5
    delivered = [r for r in uploads_of(fake, first) if r.status == 200]
    assert len(delivered) == 1 and delivered[0].time >= outage.until, "delivered once, after the outage"
    assert "Done" in (await final_message(fake, second, timeout=60)).content
    await asyncio.sleep(2)  # time for a second delivery, were there one
    for interaction in (first, second):
        assert sum("Done" in m.content for m in fake.messages_for(interaction)) == 1
        assert [r.status for r in uploads_of(fake, interaction)][-1] == 200
    assert len([r for r in uploads_of(fake, first) if r.status == 200]) == 1
    code, body = await readiness(bot)
    assert code == 200 and body["checks"]["deliveries"] is True, body
    assert outage.until <= time.monotonic()


@pytest.mark.parametrize("bot", [{"STEMBOT_TRANSIENT_RETRY_S": "5"}], indirect=True)
async def test_an_outage_longer_than_the_budget_fails_the_job_uncharged_told_once(fake, bot, tmp_path):
    fake.fail_uploads_for(600, status=503)
    interaction = await fake.send_slash_command(
        "split", [attachment_option("file", upload(fake, tmp_path, seconds=3.0))], user=fake.make_user("late"))
    result = await final_message(fake, interaction, timeout=90)  # discord.py's own 25 s, then 5 s
    assert "Couldn't split" in result.content and "Discord would not take them" in result.content
    assert "nothing was charged" in result.content and len(result.content) < 250
    await asyncio.sleep(2)
    assert sum("Couldn't split" in m.content for m in fake.messages_for(interaction)) == 1
    assert not any(r.status == 200 for r in uploads_of(fake, interaction))
    with sqlite3.connect(tmp_path / "data" / "stembot.sqlite3") as db:
        [(state, kind, quota, notified)] = db.execute(
            "SELECT state, error_kind, quota_state, notified_at FROM jobs").fetchall()
    assert (state, kind, quota) == ("failed", "outage", "released") and notified is not None
