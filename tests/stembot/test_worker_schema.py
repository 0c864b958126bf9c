"""`stembot worker` refuses to take jobs on a database whose schema is not its own version's."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from core.db import head_revision, upgrade
from core.distributed.queue_schema import install_schema


def run_worker(url: str, tmp_path, model_dir) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STEMBOT_"))}
    env = {**clean, "STEMBOT_QUEUE": "postgres", "STEMBOT_DATABASE_URL": url, "STEMBOT_DATA_DIR": str(tmp_path),
           "STEMBOT_MODEL": "tiny", "STEMBOT_MODEL_DIR": str(model_dir), "STEMBOT_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "stembot", "worker"], env=env, capture_output=True, text=True,
                          timeout=120)


async def set_revision(url: str, revision: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    await engine.dispose()


def test_a_worker_on_an_older_schema_takes_no_job_and_says_to_upgrade(postgres_server, tmp_path, model_dir):
    from tests.support.postgres import reset_database

    reset_database(postgres_server)
    upgrade(postgres_server, "0005")
    asyncio.run(install_schema(postgres_server))
    result = run_worker(postgres_server, tmp_path, model_dir)
    assert result.returncode == 1
    assert f"schema is at revision 0005, but this worker needs {head_revision()}" in result.stderr
    assert "stembot db upgrade" in result.stderr and "Traceback" not in result.stderr


def test_a_worker_older_than_the_database_says_to_upgrade_itself(postgres_server, tmp_path, model_dir):
    from tests.support.postgres import reset_database

    reset_database(postgres_server)
    upgrade(postgres_server)
    asyncio.run(install_schema(postgres_server))
    asyncio.run(set_revision(postgres_server, "9999_from_a_newer_version"))
    result = run_worker(postgres_server, tmp_path, model_dir)
    assert result.returncode == 1
    assert "newer than this worker knows" in result.stderr and "Traceback" not in result.stderr
