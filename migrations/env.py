"""Alembic environment: runs migrations on the async engine stembot uses.

The URL comes from the Alembic config (set by `core.db.upgrade`) or, for the plain
`alembic` command, from stembot's settings.
"""

import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

# Imported for their tables, which they register on Base.metadata.
import core.challenges
import core.distributed.fleet
import core.jobs.job
import core.jobs.quotas  # noqa: F401 - only `core` is bound; these imports register tables
from core.db import Base
from core.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    return get_settings().resolved_database_url


def _configure(connection=None, url=None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=True,
        compare_type=True,
    )


def run_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run_sync)
    await engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_online())
