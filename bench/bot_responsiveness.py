"""Benchmark: does the bot stay responsive while its worker separates at full load, and
how soon does a job show where it stands?

The real `stembot run` process (embedded mode: its own model host, here an htdemucs-sized
random-weight model on the CPU) talks to the fake Discord of the tests over loopback.

1. Time to first progress, on a warm, idle worker: from the /split command to the status
   message showing the job's place in the queue, to it showing the job running, to the
   separation stage, and to the first non-zero percentage.
2. Under load: while the model host separates (more jobs queued behind), /queue is asked
   every 0.5 s; its reply time is measured from sending the interaction to Discord getting
   the answer. The bot's event-loop lag comes from its own histogram
   (`stembot_event_loop_lag_seconds` on /metrics), taken over the load window only.

    python bench/bot_responsiveness.py --load-s 60
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp

from bench.separate_vs_demucs import build_model
from tests.bot.conftest import BotProcess
from tests.support.fake_discord import FakeDiscord, attachment_option
from tests.support.media import music

PERCENT = re.compile(r"`\s*(\d+)%")


async def first_time(fake, interaction, predicate, since: float, timeout: float = 300.0) -> float:
    """Seconds from `since` until a message of the interaction satisfies `predicate`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in fake.messages_for(interaction):
            if not message.is_loading and predicate(message.content):
                return time.monotonic() - since
        await asyncio.sleep(0.005)
    contents = [m.content for m in fake.messages_for(interaction)]
    raise TimeoutError(f"the status never showed it; messages: {contents}")


async def lag_histogram(session: aiohttp.ClientSession, ops_url: str) -> dict[float, float]:
    async with session.get(f"{ops_url}/metrics") as response:
        text = await response.text()
    buckets = {}
    for line in text.splitlines():
        if line.startswith("stembot_event_loop_lag_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return buckets


def song(fake, work: Path, name: str, seconds: float) -> dict:
    path = music(work / name, seconds=seconds, tone=random.uniform(200, 900))
    return fake.add_attachment(name, path.read_bytes(), content_type="audio/wav")


async def main_async(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="stembot-bench-bot-"))
    models = work / "models"
    build_model(models, "htdemucsrand")
    for nice in args.nice:
        print(f"-- model host niceness +{nice}", flush=True)
        await one_round(args, work / f"nice{nice}", models, nice)


async def one_round(args, work: Path, models: Path, nice: int) -> None:
    work.mkdir(parents=True)
    async with FakeDiscord() as fake:
        # BotProcess points STEMBOT_DISCORD_CDN_URL at the fake, whose CDN is on loopback.
        bot = BotProcess(fake, work / "bot", models, STEMBOT_MODEL="htdemucsrand", STEMBOT_SHIFTS="0",
                         STEMBOT_MODEL_HOST_NICE=str(nice))
        await bot.start(ready_timeout=180)  # ready = the model host loaded and warmed up
        try:
            users = [fake.make_user(f"member{i}") for i in range(4)]
            # 1. Time to first progress on a warm, idle worker.
            attachment = song(fake, work, "first.wav", args.song_s)
            sent = time.monotonic()
            first = await fake.send_slash_command("split", [attachment_option("file", attachment)], user=users[0])
            shown = await first_time(fake, first, lambda c: "Queued" in c or "Next in line" in c
                                     or "Downloading" in c or "Decoding" in c or "Separating" in c, sent)
            running = await first_time(fake, first, lambda c: "Decoding" in c or "Separating" in c, sent)
            separating = await first_time(fake, first, lambda c: "Separating" in c, sent)
            percent = await first_time(fake, first, lambda c: "Separating" in c and any(
                int(p) > 0 for p in PERCENT.findall(c)), sent)
            print(f"time to first progress: status shown {shown:.2f} s after the command; job running "
                  f"{running:.2f} s; separating {separating:.2f} s; first non-zero % {percent:.2f} s "
                  f"({percent - running:.2f} s after the job started)", flush=True)

            # 2. Under load: the model host separates; two more jobs wait behind.
            jobs = [first]
            for i, user in enumerate(users[1:3], start=1):
                more = song(fake, work, f"load{i}.wav", args.song_s)
                jobs.append(await fake.send_slash_command("split", [attachment_option("file", more)], user=user))

            def busy() -> bool:
                """Whether some job's status says the model host is working on it."""
                return any(any(stage in m.content for stage in ("Decoding", "Separating", "Encoding"))
                           for job in jobs for m in fake.messages_for(job)[-1:])
            async with aiohttp.ClientSession() as session:
                before = await lag_histogram(session, bot.ops_url)
                replies, busy_polls = [], 0
                end = time.monotonic() + args.load_s
                while time.monotonic() < end:
                    asked = time.monotonic()
                    interaction = await fake.send_slash_command("queue", user=users[3])
                    while not interaction.acknowledged:
                        await asyncio.sleep(0.002)
                    replies.append(time.monotonic() - asked)
                    busy_polls += busy()
                    await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - asked)))
                after = await lag_histogram(session, bot.ops_url)
            window = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
            total = window[float("inf")]
            within_50ms = window[0.05] / total if total else float("nan")
            worst = max((b for b in window if window[b] > window.get(_below(window, b), 0.0)), default=0.0)
            ordered = sorted(replies)
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            done = [await first_time(fake, job, lambda c: "Done" in c, time.monotonic(), timeout=900) for job in jobs]
            took = [re.search(r"separated in (\d+) s", m.content) for job in jobs for m in fake.messages_for(job)
                    if "Done" in m.content]
            print(f"under load ({args.load_s:.0f} s, model host busy at {busy_polls}/{len(replies)} asks): "
                  "/queue replies "
                  f"n={len(replies)} p50 {statistics.median(replies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                  f"max {ordered[-1] * 1000:.0f} ms; event-loop lag samples n={total:.0f}, "
                  f"{within_50ms * 100:.2f}% within 50 ms (p99 < 50 ms: {within_50ms >= 0.99}), "
                  f"worst bucket <= {worst * 1000:.0f} ms; separation of the three "
                  f"{args.song_s:.0f}-s songs: {', '.join(t.group(1) + ' s' for t in took if t)}", flush=True)
            del done
        finally:
            await bot.stop()


def _below(window: dict[float, float], bound: float) -> float:
    lower = [b for b in window if b < bound]
    return max(lower) if lower else -1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--song-s", type=float, default=60.0, help="length of each song")
    parser.add_argument("--load-s", type=float, default=60.0, help="how long to ask /queue under load")
    parser.add_argument("--nice", type=int, nargs="+", default=[0, 10],
                        help="model host niceness of each round (STEMBOT_MODEL_HOST_NICE)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
