"""Migrations: plain SQL files ``migrations/NNNN_name.sql``, applied in order, each in its own
transaction with its row in ``schema_version``. An advisory lock makes concurrent starters (several
gateway replicas, a CLI run) apply each file once.

Plain files rather than Alembic: the schema is three tables, written in SQL either way, and Alembic
would bring SQLAlchemy (an ORM the project does not use) for the bookkeeping done here in 20 lines.
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg

from gateway.ledger import LedgerRecord

MIGRATE_LOCK = 0x6C65_6467_0001  # pg_advisory_lock key: one migrator at a time
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration, in order."""
    found = []
    for entry in resources.files("gateway.archive").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: psycopg.AsyncConnection[object]) -> list[str]:
    """Apply the migrations not applied yet; returns their file names. ``conn`` must be in autocommit."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM schema_version")
        done = {row[0] for row in await cur.fetchall()}  # type: ignore[index]
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql.encode())
                await conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
    await check_columns(conn)
    return applied


async def check_columns(conn: psycopg.AsyncConnection[object]) -> None:
    """Every ``LedgerRecord`` field has its column: a field added to the record without a migration
    would otherwise be lost silently on the way to the archive."""
    cur = await conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'ledger_records'"
        " AND table_schema = current_schema()"
    )
    columns = {row[0] for row in await cur.fetchall()}  # type: ignore[index]
    missing = [f for f in LedgerRecord.__struct_fields__ if f not in columns]
    if missing:
        raise RuntimeError(f"the archive has no column for {', '.join(missing)}: add a migration")
