"""Fixtures of the job tests: a migrated database of each kind, through the test quota helpers."""

from __future__ import annotations

import pytest_asyncio

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
