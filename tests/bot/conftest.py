"""Runs the real `stembot run` process against the fake Discord on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import pytest_asyncio

from tests.support.fake_discord import FakeDiscord

REPOSITORY = str(Path(__file__).resolve().parents[2])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BotProcess:
    """`python -m stembot run` with its environment pointing at `fake`."""

    def __init__(self, fake: FakeDiscord, data_dir: Path, model_dir: Path, **env: str):
        self.fake = fake
        self.web_port = free_port()
        self.ops_port = free_port()
        self.env = {
            **os.environ,
            "STEMBOT_DISCORD_TOKEN": "fake-bot-token",
            "STEMBOT_DISCORD_API_URL": fake.api_url,
            "STEMBOT_DISCORD_GATEWAY_URL": fake.gateway_url,
            "STEMBOT_DATA_DIR": str(data_dir),
            "STEMBOT_MODEL": "tiny",
            "STEMBOT_MODEL_DIR": str(model_dir),
            "STEMBOT_SHIFTS": "0",
            "STEMBOT_WEB_PORT": str(self.web_port),
            "STEMBOT_OPS_PORT": str(self.ops_port),
            "PYTHONUNBUFFERED": "1",
            # As an operator of a Discord-compatible server would: attachments come from the
            # fake's own origin, and links may reach the loopback web servers of the tests.
            "STEMBOT_DISCORD_CDN_URL": fake.base_url,
            "STEMBOT_FETCH_ALLOWED_NETWORKS": "127.0.0.0/8",
            **env,
        }
        self.data_dir = data_dir
        self.process: asyncio.subprocess.Process | None = None
        self.log = data_dir / "bot.log"

    @property
    def web_url(self) -> str:
        """The public listener: download links."""
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def ops_url(self) -> str:
        """The operators' listener: /livez, /readyz, /metrics."""
        return f"http://127.0.0.1:{self.ops_port}"

    async def start(self, ready_timeout: float = 60.0) -> None:
        identifies = len(self.fake.identifies)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stembot", "run", env=self.env, stdout=out, stderr=out,
            cwd=str(self.data_dir), start_new_session=True,
        )
        out.close()
        await self.fake.wait_for(lambda: len(self.fake.identifies) > identifies, timeout=ready_timeout,
                                 what=f"the bot to identify (log: {self.log})")
        await self.wait_ready(ready_timeout)

    async def wait_ready(self, timeout: float) -> None:
        """Until /readyz says the gateway, the database and the warmed-up worker are fine."""
        import aiohttp

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(f"the bot exited with {self.process.returncode}:\n{self.read_log()}")
                try:
                    async with session.get(f"{self.ops_url}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"bot not ready within {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")[-5000:] if self.log.exists() else ""

    async def kill(self) -> None:
        """kill -9 the bot and everything it started (its model host)."""
        if self.process and self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                await self.kill()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fake():
    async with FakeDiscord() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bot(fake, model_dir, tmp_path_factory):
    """One bot for the tests of a module (starting one takes seconds)."""
    # PYTHONPATH: the model folder's `mixstems` is a class of tests/support, which the model
    # host must import to load it (as an operator's own model class would be installed).
    process = BotProcess(fake, tmp_path_factory.mktemp("bot"), model_dir,
                         STEMBOT_PUBLIC_URL="http://127.0.0.1:{port}", PYTHONPATH=REPOSITORY)
    process.env["STEMBOT_PUBLIC_URL"] = process.web_url
    await process.start()
    yield process
    await process.stop()
