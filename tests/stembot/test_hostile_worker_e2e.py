"""Distributed mode end to end against a hostile worker: the real `stembot run` bot, a real
`stembot worker` whose upload step its owner replaced (tests/support/hostile_worker.py),
PostgreSQL, a moto S3 server and the fake Discord.

The worker keeps every presigned URL it is given, tries to store an extra file and an
oversized stem, reports a stem outside its folder, writes a note that mentions everyone,
and overwrites the stems it stored once the bot has delivered them. Nothing but the valid
stems of each job may leave the bot, and the next member who sends the same song must get
the stems the bot checked, as attachments and through download links.

Moto enforces no POST policy: what S3 would have let each of the worker's uploads do is
judged from the signed policies it kept (tests/support/s3_policy.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from core.jobs.uploads import KNOWN_SOURCES
from core.media.audio import Limits, probe
from tests.bot.conftest import BotProcess
from tests.bot.helpers import final_message
from tests.stembot.test_distributed_e2e import (
    WorkerProcess,
    distributed,  # noqa: F401 - the fixture, shared
    query,
    ready_slots,
    wait_until,
)
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import music
from tests.support.s3_policy import expires_at, s3_accepts, signed_policy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SECONDS = 8.0
STEMS = ("drums", "bass", "other", "vocals")
VALID = {f"{stem}.mp3" for stem in STEMS} | {"preview.png"}
REFUSED = "the worker's results did not check out; please try again"


class HostileWorker(WorkerProcess):
    """The worker, started through the launcher that turns it against the bot."""

    def __init__(self, setup: dict, name: str, loot: Path, mention_user: str, mention_role: str):
        super().__init__(setup, name)
        self.loot = loot
        self.env.update(HOSTILE_LOOT=str(loot), HOSTILE_MENTION_USER=mention_user, HOSTILE_MENTION_ROLE=mention_role)

    async def start(self) -> None:
        out = open(self.log, "ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.hostile_worker", env=self.env, stdout=out, stderr=out,
            cwd=REPO, start_new_session=True)
        out.close()


def result(fake: FakeDiscord, interaction):
    """The job's one result message."""
    [message] = [m for m in fake.messages_for(interaction) if "Done" in m.content]
    return message


def link_urls(message) -> dict[str, str]:
    return {c["label"]: c["url"] for row in message.components for c in row.get("components", []) if c.get("url")}


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, response.status
        return await response.read()


def check_stem(data: bytes, tmp_path: Path, name: str) -> None:
    """Real mp3 audio of the song's length (ffprobe, as the bot checks)."""
    path = tmp_path / f"check-{time.monotonic_ns()}-{name}"
    path.write_bytes(data)
    info = probe(path, Limits(min_duration_s=SECONDS - 1, max_duration_s=SECONDS + 1, max_input_bytes=len(data)))
    assert info.codec == "mp3" and abs((info.duration_s or 0) - SECONDS) < 1.0, (name, info)


async def test_a_hostile_worker_gets_nothing_but_valid_stems_past_the_bot(distributed, tmp_path):  # noqa: F811 - the fixture imported above
    url = distributed["url"]
    loot = tmp_path / "loot"
    async with FakeDiscord() as fake:
        users = {name: fake.make_user(name) for name in ("alice", "bob", "carol", "dave", "erin")}
        worker = HostileWorker(distributed, "rented", loot, mention_user=users["bob"]["id"], mention_role="4242")
        bot = BotProcess(fake, tmp_path / "bot", Path(distributed["worker"]["STEMBOT_MODEL_DIR"]),
                         **distributed["bot"])
        try:
            await worker.start()
            await ready_slots(url, 1, timeout=120)
            await bot.start()
            song = music(tmp_path / "song.wav", seconds=SECONDS, tone=330.0).read_bytes()

            def send(name: str, data: bytes, user: str, **extra):
                attachment = fake.add_attachment(name, data, content_type="audio/wav")
                return fake.send_slash_command("split", [attachment_option("file", attachment)],
                                               user=users[user], **extra)

            first = await send("song.wav", song, "alice")
            escape = await send("escape.wav", music(tmp_path / "e.wav", seconds=SECONDS, tone=500.0).read_bytes(),
                                "dave")
            big = await send("big.wav", music(tmp_path / "b.wav", seconds=SECONDS, tone=700.0).read_bytes(), "erin")

            # The first song is delivered: its valid stems only, the note unable to mention anyone.
            await final_message(fake, first, timeout=240)
            delivered = result(fake, first)
            first_files = {a.filename: a.data for a in delivered.attachments}
            assert set(first_files) == VALID
            for name in VALID - {"preview.png"}:
                check_stem(first_files[name], tmp_path, name)
            assert first_files["preview.png"].startswith(b"\x89PNG")
            assert "everyone" in delivered.content and "@everyone" not in delivered.content
            assert "@here" not in delivered.content and f"<@{users['bob']['id']}>" not in delivered.content
            assert "<@&4242>" not in delivered.content

            # Then the worker overwrites what it stored, with audio that would pass every check.
            [(first_id,)] = await query(url, "SELECT id FROM jobs WHERE source_name = 'song.wav'")
            async def overwritten() -> bool:
                return (loot / f"{first_id}.overwritten").exists()
            await wait_until(overwritten, 60, "the worker to overwrite the delivered stems")
            tampered = {p.name: p.read_bytes() for p in (loot / f"{first_id}.tampered").iterdir()}
            assert set(tampered) == VALID and all(tampered[n] != first_files[n] for n in VALID)

            # The same song again: served from the cache, as attachments and (a small upload
            # limit) as download links, both from the bytes the bot checked.
            again = await send("same-song.wav", song, "bob")
            await final_message(fake, again, timeout=60)
            linked = await send("song-again.wav", song, "carol", attachment_size_limit=100 * 1024)
            await final_message(fake, linked, timeout=60)
            again_files = {a.filename: a.data for a in result(fake, again).attachments}
            assert again_files == first_files, "the cache served what the worker wrote after delivery"
            links = link_urls(result(fake, linked))
            assert set(links) == VALID - {"preview.png"}
            for name, link in links.items():
                assert await fetch(link) == first_files[name], f"{name}: the link serves the worker's overwrite"
            cached = await query(url, "SELECT cache_hit FROM jobs WHERE source_name IN "
                                      "('same-song.wav', 'song-again.wav')")
            assert [row.cache_hit for row in cached] == [True, True]

            # A stem outside its folder, an oversized stem: refused, uncharged, nothing sent.
            for interaction in (escape, big):
                ended = await final_message(fake, interaction, timeout=240)
                assert REFUSED in ended.content and not ended.attachments and not link_urls(ended)
            refused = await query(url, "SELECT state, error_kind, quota_state FROM jobs "
                                       "WHERE source_name IN ('escape.wav', 'big.wav')")
            assert [(r.state, r.error_kind) for r in refused] == [("failed", "bad_results")] * 2
            assert all(r.quota_state != "charged" for r in refused)

            # Everything that reached Discord: valid stems of the song and the pictures, no
            # extra file, and no message able to mention anyone but its own member.
            sent = [a for m in fake.messages.values() for a in m.attachments]
            assert {a.filename for a in sent} <= VALID
            assert all(a.data == first_files[a.filename] for a in sent)
            notes = [r.json for r in fake.requests
                     if isinstance(r.json, dict) and "free nitro" in (r.json.get("content") or "")]
            assert len(notes) == 2  # the first result and its cache hit (links carry a note of their own)
            for body in notes:
                assert "@everyone" not in body["content"] and "@here" not in body["content"]
                mentions = body.get("allowed_mentions")
                # Nobody from the text: at most the member the result is for.
                assert mentions is not None and mentions.get("parse") == [] and not mentions.get("roles"), mentions
                assert len(mentions.get("users", [])) <= 1, mentions

            # What S3 itself would have let the worker do with the policies it kept: only its
            # own files, of honest sizes, for the length of the run; the overwrite, yes.
            for job_id in (row.id for row in await query(url, "SELECT id FROM jobs WHERE cache_hit = false")):
                transfer = json.loads((loot / f"{job_id}.json").read_text())
                posts = transfer.get("stems_posts")
                assert posts is not None and "stems_post" not in transfer, "a policy for a whole prefix"
                # `all` of a model folder's model (`tiny`): every published source, in mp3 or opus
                assert set(posts) == {f"{s}.{ext}" for s in KNOWN_SOURCES for ext in ("mp3", "opus")} | {"preview.png"}
                bucket = posts["preview.png"]["url"].rstrip("/").rsplit("/", 1)[1]
                for post in posts.values():
                    policy = signed_policy(post["fields"])
                    assert expires_at(policy) < time.time() + 3 * 3600, "an upload policy outlives the run"
                attempts = json.loads((loot / f"{job_id}.attempts.json").read_text())
                for attempt in attempts:
                    allowed = s3_accepts(posts[attempt["policy"]], bucket=bucket, key=attempt["key"],
                                         size=attempt["size"], now=time.time())
                    assert allowed == (attempt["why"] == "overwrite after delivery"), attempt
        finally:
            await bot.stop()
            await worker.stop()
