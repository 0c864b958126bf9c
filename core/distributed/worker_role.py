"""The database role of `stembot worker`s: the least a worker needs of the shared PostgreSQL.

Workers are often rented GPU hosts; the database URL is the one secret they keep, and with
the bot's own login it would show every row: interaction tokens (which post as the bot),
server policies, quotas, tiers, challenges. A worker's own LOGIN role gets only:

- `jobs`: SELECT on the columns a run reads and UPDATE on those it writes
  (`core.jobs.job.RUN_READS`, `RUN_WRITES`), no INSERT or DELETE. Row-level security: it
  reads the rows of unfinished and failed jobs (never done or cancelled ones), and changes
  only running jobs, into the states a run leaves a job in.
- `worker_slots`: read, add, refresh and remove slot rows (its heartbeats).
- `alembic_version`: read only (a worker refuses a schema other than its own version's).
- procrastinate's tables and sequences: the queue (its functions run with the caller's
  rights).
- nothing else: not `interaction_tokens`, `guild_policies`, `role_tiers`, `quota_usage`,
  `quota_slots`, the challenges' tables.

`stembot db worker-role NAME` creates the role (or takes an existing one) and applies all
this; `stembot db upgrade` applies it again to every worker role, since a migration may add
a column that a run reads. The worker roles are the ones the row policy names, so nothing
else keeps a list. Other roles see no change: a permissive policy lets them see every row
as before (the tables' owner, the bot's login, is not subject to row security anyway).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import LiteralString

import psycopg
from psycopg import sql

from core.distributed.fleet import WorkerSlot
from core.distributed.queue import conninfo
from core.errors import StembotError
from core.jobs.job import RUN_FROM, RUN_READS, RUN_SEES, RUN_TO, RUN_WRITES, Job

# A plain lower-case name: no quoting surprises in SQL, URLs or logs.
ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
READ_POLICY = "stembot_worker_reads"
WRITE_POLICY = "stembot_worker_writes"
EVERYONE_POLICY = "stembot_everyone"
JOBS = Job.__tablename__
SLOTS = WorkerSlot.__tablename__


class WorkerRoleError(StembotError):
    kind = "worker_role"


@dataclass(frozen=True)
class WorkerRole:
    name: str
    created: bool
    generated_password: str | None  # set when a new role got a generated password


def check_name(name: str) -> str:
    if not ROLE_NAME.fullmatch(name):
        raise WorkerRoleError(f"{name!r} is not a plain role name: use lower-case letters, digits and _ "
                              "(at most 63, not starting with a digit)")
    return name


async def ensure_worker_role(database_url: str, name: str, password: str | None) -> WorkerRole:
    """Create LOGIN role `name` if it does not exist, with `password` or a generated one;
    set an existing role's password when one is given; then (re)apply the worker's grants.
    The password reaches the server only hashed (SCRAM or MD5, as the server keeps them)."""
    check_name(name)
    async with await psycopg.AsyncConnection.connect(conninfo(database_url)) as connection:
        me = await _scalar(connection, "SELECT current_user")
        if name == me:
            raise WorkerRoleError(f"{name} is the login this command runs as (the bot's): give workers a role "
                                  "of their own")
        row = await (await connection.execute(
            "SELECT rolsuper, rolbypassrls, pg_has_role(rolname, current_user, 'MEMBER'), "
            "EXISTS (SELECT FROM pg_class WHERE relowner = r.oid) FROM pg_roles r WHERE rolname = %s",
            [name])).fetchone()
        if row is not None and any(row):
            raise WorkerRoleError(f"role {name} is a superuser, bypasses row security, is a member of {me} or "
                                  "owns tables: it would keep more rights than a worker's; choose another name")
        created = row is None
        generated = secrets.token_urlsafe(24) if created and password is None else None
        password = password or generated
        if password is not None:
            algorithm = await _scalar(connection, "SHOW password_encryption")
            hashed = connection.pgconn.encrypt_password(password.encode(), name.encode(), algorithm.encode())
            verb = "CREATE ROLE {} LOGIN PASSWORD {}" if created else "ALTER ROLE {} LOGIN PASSWORD {}"
            try:
                await connection.execute(sql.SQL(verb).format(sql.Identifier(name), sql.Literal(hashed.decode())))
            except psycopg.errors.InsufficientPrivilege as exc:
                raise WorkerRoleError(f"{me} may not create or change roles (it needs CREATEROLE): have an "
                                      f"administrator create role {name} (README, distributed mode), then run "
                                      "this again to grant it") from exc
        roles = sorted({*await _worker_roles(connection), name})
        await _apply(connection, roles)
        await connection.commit()
    return WorkerRole(name, created, generated)


async def reapply_worker_grants(database_url: str) -> list[str]:
    """Apply the worker's grants again to every worker role (after migrations). Returns them."""
    async with await psycopg.AsyncConnection.connect(conninfo(database_url)) as connection:
        roles = await _worker_roles(connection)
        if roles:
            await _apply(connection, roles)
            await connection.commit()
    return roles


async def _worker_roles(connection: psycopg.AsyncConnection) -> list[str]:
    """The roles the worker row policy names (dropped roles drop out of it by themselves)."""
    rows = await (await connection.execute(
        "SELECT r.rolname FROM pg_policy p JOIN pg_roles r ON r.oid = ANY (p.polroles) "
        "WHERE p.polrelid = to_regclass(%s) AND p.polname = %s ORDER BY 1", [JOBS, READ_POLICY])).fetchall()
    return [r[0] for r in rows]


async def _apply(connection: psycopg.AsyncConnection, roles: list[str]) -> None:
    """Grant `roles` exactly what a worker needs, in one transaction (the caller commits)."""
    schema = await _scalar(connection, "SELECT current_schema()")
    queue_tables = await _queue_objects(connection, schema, "r")
    queue_sequences = await _queue_objects(connection, schema, "S")
    if not queue_tables:
        raise WorkerRoleError("the job queue's tables are missing: run `stembot db upgrade` first")
    without_usage = [role for role in roles if not await _has_usage(connection, role, schema)]
    who = sql.SQL(", ").join(sql.Identifier(role) for role in roles)
    names = lambda columns: sql.SQL(", ").join(sql.Identifier(c) for c in columns)  # noqa: E731
    states = lambda values: sql.SQL(", ").join(sql.Literal(s.value) for s in values)  # noqa: E731
    table = lambda name: sql.Identifier(schema, name)  # noqa: E731
    statements = [
        # From nothing, so that a right taken away here (or a column dropped) is really gone.
        sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(sql.Identifier(schema), who),
        sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(sql.Identifier(schema), who),
        # (Usually every role has it, through PUBLIC; only the schema's owner may grant it.)
        *(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(role))
          for role in without_usage),
        sql.SQL("GRANT SELECT ({}) ON {} TO {}").format(names(RUN_READS), table(JOBS), who),
        sql.SQL("GRANT UPDATE ({}) ON {} TO {}").format(names(RUN_WRITES), table(JOBS), who),
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(table(SLOTS), who),
        # Read only: a worker checks at start that the schema is its own version's.
        sql.SQL("GRANT SELECT ON {} TO {}").format(table("alembic_version"), who),
        *(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(table(t), who) for t in queue_tables),
        *(sql.SQL("GRANT USAGE, SELECT ON SEQUENCE {} TO {}").format(table(s), who) for s in queue_sequences),
        sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table(JOBS)),
        # Every other role sees the rows as before; the restrictive policies narrow the workers'.
        sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(EVERYONE_POLICY), table(JOBS)),
        sql.SQL("CREATE POLICY {} ON {} AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)").format(
            sql.Identifier(EVERYONE_POLICY), table(JOBS)),
        sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(READ_POLICY), table(JOBS)),
        sql.SQL("CREATE POLICY {} ON {} AS RESTRICTIVE FOR SELECT TO {} USING (state IN ({}))").format(
            sql.Identifier(READ_POLICY), table(JOBS), who, states(RUN_SEES)),
        sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(WRITE_POLICY), table(JOBS)),
        sql.SQL("CREATE POLICY {} ON {} AS RESTRICTIVE FOR UPDATE TO {} USING (state IN ({})) "
                "WITH CHECK (state IN ({}))").format(
            sql.Identifier(WRITE_POLICY), table(JOBS), who, states(RUN_FROM), states(RUN_TO)),
    ]
    for statement in statements:
        await connection.execute(statement)


async def _queue_objects(connection: psycopg.AsyncConnection, schema: str, kind: str) -> list[str]:
    """procrastinate's tables (`r`) or sequences (`S`) in `schema`, whatever its version made."""
    rows = await (await connection.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = %s AND c.relname LIKE 'procrastinate\\_%%' ORDER BY 1",
        [schema, kind])).fetchall()
    return [r[0] for r in rows]


async def _has_usage(connection: psycopg.AsyncConnection, role: str, schema: str) -> bool:
    row = await (await connection.execute("SELECT has_schema_privilege(%s, %s, 'USAGE')", [role, schema])).fetchone()
    return bool(row and row[0])


async def _scalar(connection: psycopg.AsyncConnection, query: LiteralString) -> str:
    row = await (await connection.execute(query)).fetchone()
    assert row is not None, query
    return str(row[0])
