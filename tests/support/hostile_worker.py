"""A `stembot worker` on a machine whose owner turned against the bot (a rented GPU host).

    python -m tests.support.hostile_worker      # a worker's environment, plus HOSTILE_LOOT=<folder>

It changes the worker's own code in its own process, as the owner of the machine can, then
runs the real CLI's `stembot worker`: stembot's code is unchanged, only this process's
copy of the worker's upload step (`RemoteJobFiles.publish`) is replaced. The jobs still
run on the real model host. For every job it keeps the job's presigned URLs
(HOSTILE_LOOT/<job>.json), stores the honest stems, then tries to store an extra file
and reports a note that mentions @everyone, @here, a user and a role. By the input's name:

- "escape.wav": it reports the vocals stem's file as a path outside the stems folder;
- "big.wav": it stores an oversized vocals stem in place of the honest one;
- any other: once the bot has delivered the job, it overwrites every stored file with
  valid audio of its own, of the same format and length, and a picture of its own
  (what it wrote: HOSTILE_LOOT/<job>.tampered/; HOSTILE_LOOT/<job>.overwritten when done).

Every upload it tries is listed in HOSTILE_LOOT/<job>.attempts.json (key, size, the
policy used), so the test can say which of them S3 itself would have refused.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

LOOT = Path(os.environ.get("HOSTILE_LOOT", "loot"))
OVERSIZE = 11 * 1024 * 1024  # more than any attachment limit of the test, and than any cap for 10 s
EXTRA = ("evil.html", b"<script>alert('stembot')</script>")
PNG = b"\x89PNG\r\n\x1a\n" + b"the attacker's picture" * 10


def note(mention_user: str | None, mention_role: str | None) -> str:
    return (f"@everyone @here free nitro <@{mention_user or 1}> <@&{mention_role or 1}> "
            "https://evil.invalid/")


def policy_for(transfer: dict[str, Any], name: str) -> tuple[str, str, dict[str, str]]:
    """The URL and form fields to store `name` with, whatever the bot handed out: one policy
    per exact key (that file's, or any other one's with this key), or one for a prefix."""
    posts = transfer.get("stems_posts")
    if posts is not None:
        used = name if name in posts else next(iter(posts))
        post = posts[used]
        prefix = post["fields"]["key"].rsplit("/", 1)[0] + "/"
    else:
        used, post = "stems_post", transfer["stems_post"]
        prefix = post["prefix"]
    return used, post["url"], {**post["fields"], "key": prefix + name}


async def post_file(job_id: int, transfer: dict[str, Any], name: str, data: bytes, why: str) -> int:
    """Store `data` as `name` with the job's policies, the way a browser form does."""
    used, url, fields = policy_for(transfer, name)
    form = aiohttp.FormData()
    for field, value in fields.items():
        form.add_field(field, value)
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    async with aiohttp.ClientSession() as session, session.post(url, data=form) as response:
        status = response.status
    attempts = LOOT / f"{job_id}.attempts.json"
    done = json.loads(attempts.read_text()) if attempts.exists() else []
    done.append({"key": fields["key"], "name": name, "size": len(data), "policy": used, "why": why,
                 "status": status})
    attempts.write_text(json.dumps(done, indent=1))
    return status


def tampered_audio(honest: Path, out: Path) -> bytes:
    """Valid audio of `honest`'s format and length, with a loud tone of the attacker's own."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(honest), "-f", "lavfi", "-i",
                    "sine=f=1234:sample_rate=44100", "-filter_complex",
                    "[1]volume=0.8[t];[0][t]amix=inputs=2:duration=first:normalize=0", "-ac", "2", str(out)],
                   check=True)
    return out.read_bytes()


async def overwrite_once_delivered(job_id: int, transfer: dict[str, Any], tampered: dict[str, bytes]) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(os.environ["STEMBOT_DATABASE_URL"])
    try:
        while True:
            async with engine.connect() as connection:
                state = (await connection.execute(text("SELECT state FROM jobs WHERE id = :id"),
                                                  {"id": job_id})).scalar()
            # The workers' role no longer sees a job once it is done (row-level security):
            # the row vanishing is the sign here.
            if state is None or state in ("done", "failed", "cancelled"):
                state = state or "gone"
                break
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()
    for name, data in tampered.items():
        await post_file(job_id, transfer, name, data, "overwrite after delivery")
    (LOOT / f"{job_id}.overwritten").write_text(state)


_kept: set[asyncio.Task[None]] = set()


def install() -> None:
    from core.distributed import queue_worker

    honest_publish = queue_worker.RemoteJobFiles.publish

    async def hostile_publish(self, job, artifacts: dict[str, Any]) -> None:
        transfer = job.transfer or {}
        LOOT.mkdir(parents=True, exist_ok=True)
        (LOOT / f"{job.id}.json").write_text(json.dumps(transfer))
        await honest_publish(self, job, copy.deepcopy(artifacts))
        folder = self.stems_dir(job)
        names = list(artifacts["files"].values()) + ([artifacts["preview"]] if artifacts.get("preview") else [])
        await post_file(job.id, transfer, EXTRA[0], EXTRA[1], "extra file")
        artifacts["note"] = note(os.environ.get("HOSTILE_MENTION_USER"), os.environ.get("HOSTILE_MENTION_ROLE"))
        if job.source_name == "escape.wav":
            artifacts["files"]["vocals"] = "../input.wav"
        elif job.source_name == "big.wav":
            name = artifacts["files"]["vocals"]
            await post_file(job.id, transfer, name, (folder / name).read_bytes() + b"\0" * OVERSIZE, "oversized")
        else:
            # Made now: the worker removes the job's folder once the run ends.
            keep = LOOT / f"{job.id}.tampered"
            keep.mkdir(exist_ok=True)
            tampered = {}
            for name in names:
                if name.endswith(".png"):
                    tampered[name] = PNG
                    (keep / name).write_bytes(PNG)
                else:
                    tampered[name] = await asyncio.to_thread(tampered_audio, folder / name, keep / name)
            task = asyncio.get_running_loop().create_task(overwrite_once_delivered(job.id, transfer, tampered))
            _kept.add(task)
            task.add_done_callback(_kept.discard)

    queue_worker.RemoteJobFiles.publish = hostile_publish  # type: ignore[method-assign]


def main() -> int:
    install()
    from stembot.cli import main as stembot

    return stembot(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
