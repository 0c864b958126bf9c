"""The schema only changes through Alembic: every revision from the first to head applies
on SQLite and PostgreSQL, keeps existing rows, and leaves no drift from the models."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

# Imported for the tables they register.
import core.jobs.job
import core.jobs.quotas  # noqa: F401 - only `core` is bound; these imports register tables
from core.db import Base, alembic_config, upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'm.sqlite3'}"
    from tests.support.postgres import reset_database

    url = request.getfixturevalue("postgres_server")
    reset_database(url)
    return url


def _run(url: str, sql: str, **params):
    async def go():
        engine = create_async_engine(url)
        async with engine.begin() as connection:
            result = await connection.execute(text(sql), params)
            rows = result.fetchall() if result.returns_rows else None
        await engine.dispose()
        return rows
    return asyncio.run(go())


def _drift(url: str) -> list:
    async def go():
        engine = create_async_engine(url)
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync, opts={"compare_type": True}),
                                              Base.metadata))
        await engine.dispose()
        return diff
    return asyncio.run(go())


def test_every_revision_in_order_keeps_rows_and_ends_without_drift(empty_url):
    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(alembic_config(empty_url))
                                                  .walk_revisions()))]
    assert revisions[0] == "0001" and len(revisions) >= 3
    upgrade(empty_url, "0001")
    _run(empty_url, "INSERT INTO jobs (created_at, updated_at, user_id, attachment_size_limit, source_kind, "
                    "source_url, source_name, model, stems, format, priority, state, progress, attempts, "
                    "cancel_requested) VALUES (:t, :t, 42, 10, 'attachment', 'u', 'old.mp3', 'htdemucs', 'all', "
                    "'mp3', 0, 'done', 1.0, 1, false)", t=datetime(2026, 1, 1, tzinfo=UTC))
    for revision in revisions[1:]:
        upgrade(empty_url, revision)
    rows = _run(empty_url, "SELECT user_id, source_name, slot_state, quota_state, reserved_s, cache_hit FROM jobs")
    assert [tuple(r) for r in rows] == [(42, "old.mp3", "none", "none", 0.0, False)]
    assert _drift(empty_url) == []


def test_downgrade_to_nothing_and_back(empty_url):
    upgrade(empty_url)
    command.downgrade(alembic_config(empty_url), "base")
    tables = _run(empty_url, "SELECT name FROM sqlite_master WHERE type='table'" if empty_url.startswith("sqlite")
                  else "SELECT tablename FROM pg_tables WHERE schemaname='public'")
    assert {t[0] for t in tables} <= {"alembic_version"}
    upgrade(empty_url)
    assert _drift(empty_url) == []


def test_interaction_tokens_move_out_of_the_job_rows_and_back(empty_url):
    """0007: a job's interaction token moves to `interaction_tokens` (workers cannot read
    it there), so a bot upgraded with jobs under way still edits their replies."""
    from core.db import make_engine, make_sessions
    from core.jobs.store import JobStore

    expires = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    upgrade(empty_url, "0006")
    for name, token in (("asked.mp3", "tok-secret"), ("bulk.mp3", None)):
        _run(empty_url, "INSERT INTO jobs (created_at, updated_at, user_id, attachment_size_limit, source_kind, "
                        "source_url, source_name, model, stems, format, priority, state, progress, attempts, "
                        "cancel_requested, interaction_token, token_expires_at, slot_state, quota_state, "
                        "reserved_s, cache_hit) VALUES (:t, :t, 42, 10, 'attachment', 'u', :name, 'htdemucs', "
                        "'all', 'mp3', 0, 'separating', 0.5, 1, false, :token, :expires, 'held', 'none', 0, "
                        "false)", t=datetime(2026, 1, 1, tzinfo=UTC), name=name, token=token,
             expires=expires if token else None)
    upgrade(empty_url, "0007")
    upgrade(empty_url)  # the store reads through today's models

    async def tokens():
        engine = make_engine(empty_url)
        try:
            return {job.source_name: (job.interaction_token, job.token_expires_at, job.token_usable(
                now=datetime(2029, 1, 1, tzinfo=UTC))) for job in await JobStore(make_sessions(engine)).unfinished()}
        finally:
            await engine.dispose()
    assert asyncio.run(tokens()) == {"asked.mp3": ("tok-secret", expires, True), "bulk.mp3": (None, None, False)}
    columns = {c["name"] for c in _columns(empty_url, "jobs")}
    assert "interaction_token" not in columns and "token_expires_at" not in columns
    assert [tuple(r) for r in _run(empty_url, "SELECT token FROM interaction_tokens")] == [("tok-secret",)]
    upgrade(empty_url)  # later revisions (0008: indexes, 0009: notified_at) complete the schema the models describe
    assert _drift(empty_url) == []

    command.downgrade(alembic_config(empty_url), "0006")
    rows = _run(empty_url, "SELECT source_name, interaction_token FROM jobs ORDER BY source_name")
    assert [tuple(r) for r in rows] == [("asked.mp3", "tok-secret"), ("bulk.mp3", None)]


def _columns(url: str, table: str) -> list:
    async def go():
        engine = create_async_engine(url)
        async with engine.connect() as connection:
            found = await connection.run_sync(lambda sync: inspect(sync).get_columns(table))
        await engine.dispose()
        return found
    return asyncio.run(go())


def test_jobs_that_ended_before_0009_count_as_told(empty_url):
    """0009: `notified_at` is set on the jobs that had already ended, so a bot upgraded and
    restarted does not tell their ends again; unfinished jobs are left untold."""
    upgrade(empty_url, "0008")
    for name, state in (("failed.mp3", "failed"), ("running.mp3", "separating")):
        _run(empty_url, "INSERT INTO jobs (created_at, updated_at, finished_at, user_id, attachment_size_limit, "
                        "source_kind, source_url, source_name, model, stems, format, priority, state, progress, "
                        "attempts, cancel_requested, slot_state, quota_state, reserved_s, cache_hit) VALUES (:t, "
                        ":t, :f, 42, 10, 'attachment', 'u', :name, 'htdemucs', 'all', 'mp3', 0, :state, 0.5, 1, "
                        "false, 'none', 'none', 0, false)", t=datetime(2026, 1, 1, tzinfo=UTC),
             f=datetime(2026, 1, 2, tzinfo=UTC) if state == "failed" else None, name=name, state=state)
    upgrade(empty_url, "0009")
    rows = _run(empty_url, "SELECT source_name, notified_at IS NOT NULL FROM jobs ORDER BY source_name")
    assert [tuple(r) for r in rows] == [("failed.mp3", True), ("running.mp3", False)]
    command.downgrade(alembic_config(empty_url), "0008")
    assert "notified_at" not in {c["name"] for c in _columns(empty_url, "jobs")}
