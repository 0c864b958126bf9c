"""Fixtures of the job tests: a migrated database of each kind, through the test quota helpers,
and a runtime on a migrated SQLite file."""

from __future__ import annotations

import pytest_asyncio

from core.runtime import Runtime
from core.settings import Settings
from tests.support.quota_db import open_db


@pytest_asyncio.fixture
async def db(database_url):
    async with open_db(database_url) as db:
        yield db


@pytest_asyncio.fixture
async def wide(database_url):
    """The same database through 4 engines (60 connections): room for 50 at once."""
    async with open_db(database_url, engines=4) as db:
        yield db


@pytest_asyncio.fixture
async def runtime(sqlite_url, tmp_path):
    """stembot's runtime as an operator's defaults make it, on a migrated SQLite file."""
    runtime = Runtime.from_settings(Settings(_env_file=None, data_dir=tmp_path / "data", database_url=sqlite_url))
    yield runtime
    await runtime.close()
