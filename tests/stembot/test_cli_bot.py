"""`stembot run`, `stembot sync` and `stembot db upgrade` as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys

from tests.support.fake_discord import FakeDiscord


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.endswith("DISCORD_TOKEN")}
    return {**env, "STEMBOT_DATA_DIR": str(tmp_path / "data"), **extra}


async def _stembot(*args, env, cwd, timeout=120):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stembot", *args, env=env, cwd=str(cwd),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, out.decode(), err.decode()


async def test_run_without_a_token_says_where_to_get_one(tmp_path):
    code, out, err = await _stembot("run", env=_env(tmp_path), cwd=tmp_path, timeout=30)
    assert code == 1
    assert "no Discord bot token" in err and "STEMBOT_DISCORD_TOKEN" in err and ".env" in err
    assert "Traceback" not in err


async def test_run_reads_the_token_from_dotenv_and_fails_fast_on_a_missing_model(tmp_path):
    (tmp_path / ".env").write_text("STEMBOT_DISCORD_TOKEN=from-dotenv\nSTEMBOT_MODEL=htdemucs\n")
    env = _env(tmp_path, HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               HF_ENDPOINT="http://127.0.0.1:9")
    code, out, err = await _stembot("run", env=env, cwd=tmp_path, timeout=60)
    assert code == 1
    assert "model 'htdemucs' is not available offline" in err and "no Discord bot token" not in err


async def test_db_upgrade_creates_the_schema(tmp_path):
    code, out, err = await _stembot("db", "upgrade", env=_env(tmp_path), cwd=tmp_path)
    assert code == 0, err
    tables = {row[0] for row in sqlite3.connect(tmp_path / "data" / "stembot.sqlite3").execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "alembic_version"} <= tables


async def test_sync_registers_the_commands_once(tmp_path, model_dir):
    async with FakeDiscord() as fake:
        env = _env(tmp_path, STEMBOT_DISCORD_TOKEN="fake-bot-token", STEMBOT_DISCORD_API_URL=fake.api_url,
                   STEMBOT_DISCORD_GATEWAY_URL=fake.gateway_url, STEMBOT_MODEL="tiny",
                   STEMBOT_MODEL_DIR=str(model_dir))
        code, out, err = await _stembot("sync", "--guild", str(fake.guild_id), env=env, cwd=tmp_path)
        assert code == 0, err
        registered = fake.guild_commands[fake.guild_id]
        by_name = {c["name"]: c for c in registered}
        assert set(by_name) == {"split", "karaoke", "mix", "queue", "cancel", "help", "quota", "forget", "stembot",
                                "challenge", "Split stems"}
        admin = by_name["stembot"]
        assert int(admin["default_member_permissions"]) == 1 << 5  # Manage Server
        assert {o["name"] for o in admin["options"]} >= {"settings", "limit", "links", "channel", "tier", "stats",
                                                           "pause", "resume", "workers", "challenges"}
        # Everyone may submit and vote: who may start a challenge is checked by the bot.
        challenge = by_name["challenge"]
        assert challenge.get("default_member_permissions") is None
        assert {o["name"] for o in challenge["options"]} == {"start", "submit", "status", "end", "list"}
        start = {o["name"]: o for o in next(o for o in challenge["options"] if o["name"] == "start")["options"]}
        assert [name for name, o in start.items() if o.get("required")] == ["title", "rules", "submissions",
                                                                             "voting"]
        assert start["file"]["type"] == 11 and start["anonymous"]["type"] == 5
        split_options = {o["name"]: o for o in by_name["split"]["options"]}
        assert set(split_options) == {"file", "url", "stems", "format", "model", "tempo", "transpose", "quality",
                                      "clean"}
        assert [c["value"] for c in split_options["quality"]["choices"]] == ["fast", "best"]
        assert [c["value"] for c in split_options["clean"]["choices"]] == ["dereverb", "denoise"]
        assert (split_options["tempo"]["min_value"], split_options["tempo"]["max_value"]) == (50, 150)
        assert (split_options["transpose"]["min_value"], split_options["transpose"]["max_value"]) == (-12, 12)
        karaoke_options = {o["name"]: o for o in by_name["karaoke"]["options"]}
        assert set(karaoke_options) == {"file", "url", "format", "model", "tempo", "transpose", "quality",
                                        "backing_vocals"}
        assert [c["value"] for c in karaoke_options["backing_vocals"]["choices"]] == ["keep", "remove"]
        mix_options = {o["name"] for o in by_name["mix"]["options"]}
        assert mix_options >= {"file", "url", "without", "stems", "volumes", "tempo", "transpose"}
        assert [c["value"] for c in split_options["stems"]["choices"]] == [
            "all", "karaoke", "vocals", "drums", "bass", "other", "dialogue"]
        assert [c["value"] for c in split_options["format"]["choices"]] == ["mp3", "opus", "flac", "wav"]
        assert split_options["model"]["autocomplete"] is True
        assert by_name["Split stems"]["type"] == 3
        assert "synced 11 commands" in out
        # Syncing is explicit: nothing was put to the global command list.
        assert not fake.requests_matching("PUT", r"/applications/\d+/commands")


async def test_sigterm_stops_the_bot_and_its_worker_promptly_even_while_reconnecting(tmp_path, model_dir):
    import signal
    import time

    from tests.bot.conftest import BotProcess
    from tests.bot.helpers import model_hosts

    fake = FakeDiscord()
    await fake.start()
    bot = BotProcess(fake, tmp_path / "bot", model_dir)
    try:
        await bot.start()
        hosts = model_hosts(bot.process.pid)
        await fake.close()  # Discord goes away: discord.py backs off before reconnecting
        await asyncio.sleep(4)
        sent = time.monotonic()
        bot.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bot.process.wait(), 15) == 0
        assert time.monotonic() - sent < 10
        assert hosts and not any(os.path.exists(f"/proc/{pid}") and
                                 open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in hosts)
    finally:
        await bot.kill()


async def test_a_second_bot_on_the_same_database_exits_at_once_naming_the_first(tmp_path, model_dir):
    """Two bots on one database would both dispatch and deliver (the second requeues the
    first one's running jobs). The second exits before it connects to Discord."""
    from tests.bot.conftest import BotProcess

    async with FakeDiscord() as fake:
        first = BotProcess(fake, tmp_path / "data", model_dir)
        await first.start()
        try:
            identifies = len(fake.identifies)
            code, out, err = await _stembot("run", env=first.env, cwd=tmp_path, timeout=60)
            assert code == 1
            assert "already running on this database" in err and f"pid {first.process.pid}" in err
            assert "Traceback" not in err
            assert len(fake.identifies) == identifies  # never reached the gateway
            await first.wait_ready(10)  # the first one goes on serving
        finally:
            await first.stop()
        # Stopped: the next bot on this database starts.
        second = BotProcess(fake, tmp_path / "data", model_dir)
        await second.start()
        await second.stop()


async def test_settings_that_cannot_work_are_refused_by_name_before_anything_starts(tmp_path):
    env = _env(tmp_path, STEMBOT_DISCORD_TOKEN="t", STEMBOT_S3_BUCKET="stems", STEMBOT_RETENTION_HOURS="200")
    code, out, err = await _stembot("run", env=env, cwd=tmp_path, timeout=60)
    assert code == 2
    assert "error: settings: STEMBOT_RETENTION_HOURS is 200" in err and "at most 168" in err
    assert "Traceback" not in err
    env = _env(tmp_path, STEMBOT_DISCORD_TOKEN="t", STEMBOT_SHIFTS="many")
    code, out, err = await _stembot("run", env=env, cwd=tmp_path, timeout=60)
    assert code == 2 and "error: STEMBOT_SHIFTS: " in err and "Traceback" not in err


async def test_run_on_a_database_from_a_newer_stembot_refuses_in_one_line_before_discord(tmp_path, model_dir):
    from core.db import head_revision, upgrade

    database = tmp_path / "data" / "stembot.sqlite3"
    await asyncio.to_thread(upgrade, f"sqlite+aiosqlite:///{database}")
    with sqlite3.connect(database) as db:  # as a newer stembot's migration leaves it
        db.execute("UPDATE alembic_version SET version_num = '9999_from_a_newer_version'")
    async with FakeDiscord() as fake:
        env = _env(tmp_path, STEMBOT_DISCORD_TOKEN="fake-bot-token", STEMBOT_DISCORD_API_URL=fake.api_url,
                   STEMBOT_DISCORD_GATEWAY_URL=fake.gateway_url, STEMBOT_MODEL="tiny",
                   STEMBOT_MODEL_DIR=str(model_dir))
        code, out, err = await _stembot("run", env=env, cwd=tmp_path, timeout=60)
        assert code == 1
        assert err.splitlines() == [err.strip()] and err.startswith("error: "), err  # one line, no traceback
        assert "revision 9999_from_a_newer_version" in err and f"up to {head_revision()}" in err
        assert "upgrade stembot" in err
        assert fake.identifies == []  # it never connected to Discord
    with sqlite3.connect(database) as db:  # and left the database as it was
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("9999_from_a_newer_version",)]
