"""A throwaway PostgreSQL server on 127.0.0.1 for the tests that need a real one.

It uses the server binaries of the machine (Debian's `postgresql` package, which
`scripts/test` installs), makes a cluster in a temporary folder, and removes it at the
end. `STEMBOT_TEST_POSTGRES_URL` points the tests at an existing server instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def temporary_server():
    """Yield an asyncpg SQLAlchemy URL of a fresh database on a fresh server."""
    bin_dir = server_binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    # initdb refuses to run as root: run the server as the `postgres` system user then.
    as_user: list[str] = []
    if os.geteuid() == 0:
        pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="stembot-pg-"))
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()
    run = lambda *args: subprocess.run([*as_user, *map(str, args)], check=True, capture_output=True)  # noqa: E731
    try:
        run(bin_dir / "initdb", "-D", data, "-U", "stembot", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o",
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockets} "
            f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            "start")
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "stembot", "stembot_test")
        yield f"postgresql+asyncpg://stembot@127.0.0.1:{port}/stembot_test"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)


def reset_database(url: str) -> None:
    """Drop everything in the public schema (between tests sharing one server)."""
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def reset():
        engine = create_async_engine(url)
        async with engine.begin() as connection:
            await connection.execute(text("DROP SCHEMA public CASCADE"))
            await connection.execute(text("CREATE SCHEMA public"))
        await engine.dispose()

    asyncio.run(reset())
