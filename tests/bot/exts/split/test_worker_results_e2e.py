"""End to end: a hostile worker's results never leave the bot.

The worker is simulated the way a rented machine would act: it writes the job's row and
files. Each job below sits in `delivering` with tampered artifacts when the real bot
starts, so the real delivery path (resume -> check -> Discord) is the one that refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.bot.conftest import BotProcess
from tests.bot.helpers import final_message, upload
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import music

pytestmark = pytest.mark.asyncio(loop_scope="function")

SECRET = b"STEMBOT_DISCORD_TOKEN=the-secret-of-the-bot-host\n"
REFUSED = "the worker's results did not check out; please try again"
STEMS = ("drums", "bass", "other", "vocals")


def rows(database: Path, query: str, *args) -> list[sqlite3.Row]:
    connection = sqlite3.connect(database)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute(query, args).fetchall()
    finally:
        connection.close()


def add_delivering_job(database: Path, template: sqlite3.Row, artifacts: dict, **fields) -> int:
    """A copy of a delivered job's row, put back in `delivering` with `artifacts`, as a
    worker that finished it would leave it; no token: the result goes to the channel."""
    values = {key: template[key] for key in template.keys() if key != "id"}
    values.update(state="delivering", status_message_id=None,
                  delivered_at=None, finished_at=None, cache_hit=0, quota_state="none", slot_state="none",
                  reserved_s=0.0, artifacts=json.dumps(artifacts), error=None, error_kind=None, **fields)
    connection = sqlite3.connect(database)
    try:
        cursor = connection.execute(
            f"INSERT INTO jobs ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
            list(values.values()))
        connection.commit()
        return int(cursor.lastrowid)
    finally:
        connection.close()


def stems_folder(jobs_root: Path, job_id: int, source: Path) -> Path:
    """The job's stems folder holding a copy of `source`'s genuine stems and preview."""
    folder = jobs_root / str(job_id) / "stems"
    shutil.copytree(source, folder)
    return folder


def genuine(fmt: str = "mp3", **changes) -> dict:
    artifacts = {"files": {s: f"{s}.{fmt}" for s in STEMS}, "sizes": {s: 1 for s in STEMS},
                 "format": {"name": fmt, "mp3_bitrate_kbps": 320, "opus_bitrate_kbps": 160, "wav_depth": "16"},
                 "mode": "attach", "note": None, "preview": "preview.png"}
    artifacts.update(changes)
    return artifacts


async def test_tampered_results_are_refused_and_never_cached(tmp_path, model_dir):
    async with FakeDiscord() as fake:
        data = tmp_path / "bot"
        bot = BotProcess(fake, data, model_dir)
        await bot.start()
        # A genuine job first: its stems are the material the hostile worker reuses.
        first = await final_message(fake, await fake.send_slash_command(
            "split", [attachment_option("file", upload(fake, tmp_path, "first.wav"))]))
        assert "Done" in first.content
        await bot.stop()

        database, jobs = data / "stembot.sqlite3", data / "jobs"
        template = rows(database, "SELECT * FROM jobs WHERE state = 'done'")[0]
        source = jobs / str(template["id"]) / "stems"
        (jobs / ".env").write_bytes(SECRET)  # what `../../.env` names from a stems folder
        outside = tmp_path / "outside.mp3"
        outside.write_bytes(SECRET)
        # The next song a user sends: tampered jobs claim its hash, so a cached tampered
        # result would answer it.
        song = music(tmp_path / "next.wav", seconds=5.0, tone=523.0)
        sha = hashlib.sha256(song.read_bytes()).hexdigest()

        hostile: dict[str, int] = {}

        def add(case: str, artifacts: dict, **fields) -> Path:
            fields.setdefault("input_sha256", sha)
            hostile[case] = add_delivering_job(database, template, artifacts, **fields)
            return stems_folder(jobs, hostile[case], source)

        add("absolute path", genuine(files={**genuine()["files"], "drums": "/proc/self/environ"}))
        add("parent path", genuine(files={**genuine()["files"], "drums": "../../.env"}))
        folder = add("symlink", genuine())
        (folder / "drums.mp3").unlink()
        os.symlink(outside, folder / "drums.mp3")
        folder = add("extra stem", genuine(files={"vocals": "vocals.mp3", "drums": "drums.mp3"},
                                           sizes={"vocals": 1, "drums": 1}), stems="vocals")
        folder = add("wrong extension", genuine("wav"))
        for stem in STEMS:
            music(folder / f"{stem}.wav", seconds=5.0)
        add("oversized", genuine(), attachment_size_limit=50 * 1024)
        folder = add("not audio", genuine())
        (folder / "vocals.mp3").write_bytes(b"<html>not a song</html>\n" * 400)
        add("mentions", genuine(note="@everyone <@123> <@&456> look"), input_sha256="0" * 64)

        channel_before = len(fake.channel_messages(fake.channel_id))
        await bot.start()
        await fake.wait_for(
            lambda: all(r["state"] in ("done", "failed")
                        for r in rows(database, f"SELECT state FROM jobs WHERE id IN ({','.join('?' * len(hostile))})",
                                      *hostile.values())),
            timeout=60, what="every tampered job to end")
        ended = {r["id"]: r for r in rows(database, "SELECT id, state, error FROM jobs")}
        for case, job_id in hostile.items():
            if case == "mentions":
                assert ended[job_id]["state"] == "done", case
            else:
                assert (ended[job_id]["state"], ended[job_id]["error"]) == ("failed", REFUSED), case


        def posted():
            return fake.channel_messages(fake.channel_id)[channel_before:]

        # The row ends first, the message follows.
        refused = await fake.wait_for(
            lambda: (found := [m for m in posted() if "Couldn't split" in m.content]) and
            len(found) == len(hostile) - 1 and found, timeout=10, what="a failure message for each tampered job")
        assert all(REFUSED in m.content and not m.attachments for m in refused)
        delivered = [m for m in posted() if "Done" in m.content]
        assert len(delivered) == 1, [m.content for m in posted()]
        # Only the genuine stems of the job with the noisy note went out, and it pings nobody.
        assert [a.filename for a in delivered[0].attachments] == [f"{s}.mp3" for s in STEMS] + ["preview.png"]
        for attachment in delivered[0].attachments:
            assert attachment.data == (source / attachment.filename).read_bytes()
        assert "@everyone" not in delivered[0].content and "<@123>" not in delivered[0].content
        assert "<@&456>" not in delivered[0].content
        for message in fake.messages.values():
            assert not any(SECRET in a.data for a in message.attachments)
        # Refused files are gone with their job.
        assert not any((jobs / str(job_id)).exists() for case, job_id in hostile.items() if case != "mentions")

        # The same song as the tampered jobs claimed: separated afresh, not from a cache.
        att = fake.add_attachment("next.wav", song.read_bytes(), content_type="audio/wav")
        result = await final_message(fake, await fake.send_slash_command("split", [attachment_option("file", att)]))
        assert "Done" in result.content and "from the cache" not in result.content
        assert [a.filename for a in result.attachments] == [f"{s}.mp3" for s in STEMS] + ["preview.png"]
        await bot.stop()
