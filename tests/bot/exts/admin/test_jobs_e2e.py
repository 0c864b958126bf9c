"""`/stembot jobs list|show|retry|fail` through the fake Discord: the bot owner's job tools,
answered privately, never showing a token; anyone else is refused."""

from __future__ import annotations

import re

import pytest

from tests.bot.helpers import final_message, upload
from tests.support.fake_discord import attachment_option, integer_option, string_option

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def jobs(fake, action: str, *options, **context) -> str:
    """The private answer to `/stembot jobs <action>` (fake.user owns the application)."""
    command = [{"type": 2, "name": "jobs", "options": [{"type": 1, "name": action, "options": list(options)}]}]
    interaction = await fake.send_slash_command("stembot", command, member_permissions=0, **context)
    [answer] = await fake.wait_for_messages(interaction, 1)
    assert answer.is_ephemeral, "the job tools answer privately"
    return answer.content


async def owner(fake, name: str) -> str:
    interaction = await fake.send_slash_command("stembot", [{"type": 1, "name": name, "options": []}],
                                                member_permissions=0)
    [answer] = await fake.wait_for_messages(interaction, 1)
    return answer.content


async def test_only_the_owner_may_use_the_job_tools(fake, bot):
    stranger = fake.make_user("stranger")
    for action, options in (("list", ()), ("show", (integer_option("job", 1),)),
                            ("retry", (integer_option("job", 1),)), ("fail", (integer_option("job", 1),))):
        assert "Only the bot's owner" in await jobs(fake, action, *options, user=stranger)


async def test_the_owner_lists_shows_fails_and_retries_a_job(fake, bot, tmp_path):
    assert "Paused" in await owner(fake, "pause")  # the job stays queued while we look at it
    member = fake.make_user("member")
    job = await fake.send_slash_command("split", [attachment_option("file", upload(fake, tmp_path, "j.wav", 4.0))],
                                        user=member)
    await fake.wait_for_messages(job, 1)  # its status message

    listed = await jobs(fake, "list", string_option("state", "queued"))
    [job_id] = [int(n) for n in re.findall(r"#(\d+) queued", listed)]
    shown = await jobs(fake, "show", integer_option("job", job_id))
    assert "id:" in shown and "queued" in shown and "interaction token: present" in shown
    assert job.token not in shown and job.token not in listed

    failed = await jobs(fake, "fail", integer_option("job", job_id), string_option("reason", "maintenance"))
    assert f"Job #{job_id}: queued → failed (maintenance)" in failed
    told = await final_message(fake, job)
    assert "Couldn't split" in told.content and "maintenance" in told.content
    assert "only an unfinished job" in await jobs(fake, "fail", integer_option("job", job_id))

    assert f"Job #{job_id}: failed → queued" in await jobs(fake, "retry", integer_option("job", job_id))
    assert "Resumed" in await owner(fake, "resume")
    done = await fake.wait_for(lambda: next((m for m in fake.messages_for(job) + fake.channel_messages(fake.channel_id)
                                             if "Done" in m.content and "j.wav" in m.content), None),
                               timeout=90, what="the retried job's result")
    assert "Done" in done.content
    assert "only a failed job" in await jobs(fake, "retry", integer_option("job", job_id))
    assert "There is no job #999999" in await jobs(fake, "show", integer_option("job", 999999))
