"""Quotas as members meet them: slots, minutes, tiers, /quota, /forget, and crashes that
must not cost anyone anything."""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest
import pytest_asyncio

from tests.bot.conftest import BotProcess
from tests.bot.helpers import MANAGE_SERVER, final_message, model_hosts, private_answer, upload
from tests.support.fake_discord import attachment_option, string_option

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bot(fake, model_dir, tmp_path_factory):
    process = BotProcess(fake, tmp_path_factory.mktemp("quota-bot"), model_dir,
                         STEMBOT_QUOTA_USER_MINUTES_PER_DAY="0.5", STEMBOT_QUOTA_USER_CONCURRENT_JOBS="1",
                         STEMBOT_MAX_ATTEMPTS="2")
    await process.start()
    yield process
    await process.stop()





def quota_rows(bot):
    database = sqlite3.connect(bot.data_dir / "stembot.sqlite3")
    return {(u, round(used, 3), round(reserved, 3))
            for u, used, reserved in database.execute("SELECT user_id, used_s, reserved_s FROM quota_usage")}


async def test_one_job_at_a_time_and_minutes_per_day(fake, bot, tmp_path):
    member = fake.make_user("member")
    first = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "a.wav", 12))],
                                          user=member)
    await fake.wait_for(lambda: fake.messages_for(first), timeout=10)
    busy = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "b.wav", 3))],
                                         user=member)
    assert "already have 1 job(s) in progress" in await private_answer(fake, busy)
    assert "Done" in (await final_message(fake, first)).content

    # 12 s used of 30 s: a 25 s track does not fit; refused after download, nothing charged.
    big = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "c.wav", 25))],
                                        user=member)
    refused = await final_message(fake, big)
    assert "Couldn't split" in refused.content and "daily allowance has 0.3 min left" in refused.content
    member_id = int(member["id"])
    assert (member_id, 12.0, 0.0) in quota_rows(bot)

    quota = await fake.send_slash_command("quota", user=member)
    text = await private_answer(fake, quota)
    assert "0.3 of 0.5 min left today" in text and "0 of 1 in progress" in text and "00:00 UTC" in text


async def test_a_role_tier_raises_the_allowance(fake, bot, tmp_path):
    role = fake.snowflake()
    admin = await fake.send_slash_command(
        "stembot", [{"type": 1, "name": "tier", "options": [
            {"type": 8, "name": "role", "value": str(role)},
            {"type": 10, "name": "minutes_per_day", "value": 5.0}]}],
        member_permissions=MANAGE_SERVER)
    assert "Tier set" in await private_answer(fake, admin)
    vip = fake.make_user("vip")
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "v.wav", 40))],
                                        user=vip, roles=[role])
    assert "Done" in (await final_message(fake, job)).content
    plain = fake.make_user("plain")
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "p.wav", 40))],
                                        user=plain)
    assert "daily allowance" in (await final_message(fake, job)).content


async def test_failed_and_cancelled_jobs_cost_nothing(fake, bot, tmp_path):
    member = fake.make_user("unlucky")
    bad = fake.add_attachment("noise.mp3", os.urandom(50_000), content_type="audio/mpeg")
    job = await fake.send_slash_command("split", [attachment_option("file", bad)], user=member)
    assert "Couldn't split" in (await final_message(fake, job)).content
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "x.wav", 20))],
                                        user=member)
    status = await fake.wait_for(lambda: next((m for m in fake.messages_for(job) if m.components), None),
                                 timeout=30)
    # Cancel once the minutes are reserved, so that there is a reservation to give back.
    database = sqlite3.connect(bot.data_dir / "stembot.sqlite3")
    await fake.wait_for(lambda: database.execute(
        "SELECT quota_state FROM jobs WHERE source_name='x.wav'").fetchone() == ("reserved",), timeout=30,
        interval=0.02, what="the minutes to be reserved")
    custom_id = status.components[0]["components"][0]["custom_id"]
    await fake.send_component(custom_id, status, user=member)
    assert "Cancelled" in (await final_message(fake, job)).content
    member_id = int(member["id"])
    rows = [(used, reserved) for u, used, reserved in quota_rows(bot) if u == member_id]
    assert rows and all(used == 0 and reserved == 0 for used, reserved in rows)
    assert database.execute("SELECT quota_state FROM jobs WHERE source_name='x.wav'").fetchone() == ("released",)


async def test_a_crashing_worker_is_retried_then_the_job_fails_without_charge(fake, bot, tmp_path):
    member = fake.make_user("crashy")
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "k.wav", 28))],
                                        user=member)
    database = sqlite3.connect(bot.data_dir / "stembot.sqlite3")

    def state():
        row = database.execute("SELECT state, attempts FROM jobs WHERE source_name='k.wav'").fetchone()
        return row or (None, 0)

    for attempt in (1, 2):  # STEMBOT_MAX_ATTEMPTS=2
        # The row, not the throttled status message, says when separation runs.
        await fake.wait_for(lambda attempt=attempt: state() == ("separating", attempt), timeout=60, interval=0.02,
                            what=f"attempt {attempt} separating")
        hosts = model_hosts(bot.process.pid)
        assert len(hosts) == 1
        os.kill(hosts[0], signal.SIGKILL)
        await fake.wait_for(lambda: state()[0] != "separating", timeout=30, what="the job to leave 'separating'")
    result = await final_message(fake, job)
    assert "crashed repeatedly" in result.content
    assert database.execute("SELECT state, attempts, quota_state, slot_state FROM jobs WHERE source_name='k.wav'"
                            ).fetchall() == [("failed", 2, "released", "released")]
    # The next job runs on a fresh host.
    again = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "ok.wav", 5))],
                                          user=member)
    assert "Done" in (await final_message(fake, again)).content


async def test_forget_deletes_my_files_and_links(fake, bot, tmp_path):
    member = fake.make_user("private")
    job = await fake.send_slash_command("karaoke", [attachment_option("file", upload(fake, tmp_path, "f.wav", 4)),
                                                    string_option("format", "flac")], user=member)
    await final_message(fake, job)
    database = sqlite3.connect(bot.data_dir / "stembot.sqlite3")
    # The result reaches Discord a moment before the row says `done`.
    (job_id,) = await fake.wait_for(lambda: database.execute(
        "SELECT id FROM jobs WHERE source_name='f.wav' AND state='done'").fetchone(), timeout=5)
    assert (bot.data_dir / "jobs" / str(job_id) / "stems" / "vocals.flac").exists()
    forget = await fake.send_slash_command("forget", user=member)
    assert "Deleted the files of 1 finished job" in await private_answer(fake, forget)
    assert not (bot.data_dir / "jobs" / str(job_id)).exists()

