"""What the end-to-end tests of the bot do again and again."""

from __future__ import annotations

import random
from pathlib import Path

from tests.support.media import music

FINAL_WORDS = ("Done", "Couldn't split", "Cancelled")
MANAGE_SERVER = 1 << 5


def upload(fake, tmp_path: Path, name: str = "song.wav", seconds: float = 5.0, **kwargs) -> dict:
    """A generated song as an attachment on the fake's CDN. A different tone each time:
    the same audio twice would be answered from the results cache."""
    kwargs.setdefault("tone", random.uniform(200.0, 900.0))
    path = music(tmp_path / name, seconds=seconds, **kwargs)
    return fake.add_attachment(name, path.read_bytes(), content_type="audio/wav")


async def final_message(fake, interaction, timeout: float = 90.0):
    """The job's message once it says how the job ended."""
    return await fake.wait_for(
        lambda: next((m for m in fake.messages_for(interaction) if any(w in m.content for w in FINAL_WORDS)), None),
        timeout=timeout, what="the job's final message")


async def private_answer(fake, interaction, timeout: float = 5.0) -> str:
    """The text of an ephemeral reply, which must come within `timeout`."""
    await fake.wait_for(lambda: interaction.acknowledged, timeout=timeout, what="an answer")
    assert interaction.callback_data["flags"] & 64, "expected an ephemeral reply"
    return interaction.callback_data["content"]


def subcommand(name: str, *options) -> list[dict]:
    return [{"type": 1, "name": name, "options": list(options)}]


def model_hosts(pid: int) -> list[int]:
    """Child processes of `pid` started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                found.append(child)
    return found
