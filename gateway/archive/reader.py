"""Reading the ledger across Redis and its Postgres archive: reports, exports and verify.

A record counts in Postgres iff its stream id is at or below ``ledger_archive_state`` (the
archive's acknowledged id, ``ack``), and in Redis otherwise. A read holds the archive's shared
advisory lock (so no trim changes Redis under it) and one REPEATABLE READ snapshot of Postgres,
then reads Redis: the aggregates there, minus the records still in the stream at or below ``ack``
(archived, not yet trimmed — at most a batch, after a crash between copy and trim), plus the
rollup rows of Postgres. Totals are therefore the same before, during and after archiving.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg

from gateway import ledger_report
from gateway.archive import ArchiveUnavailable
from gateway.archive.archiver import READ_LOCK, StreamId, acknowledged, connect, format_id
from gateway.ledger import LedgerRecord
from gateway.ledger_report import Row
from gateway.store import Client

GroupKey = tuple[str, ...]
_FIELDS = ", ".join(LedgerRecord.__struct_fields__)


@contextlib.asynccontextmanager
async def snapshot(url: str) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], StreamId]]:
    """A Postgres connection inside one snapshot, the archive's ``ack`` in it, and the read lock."""
    try:
        conn = await connect(url)
        try:
            await conn.execute("SELECT pg_advisory_lock_shared(%s)", (READ_LOCK,))
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                yield conn, await acknowledged(conn)
        finally:
            await conn.close()  # ends the session: its advisory lock goes with it
    except psycopg.Error as exc:
        raise ArchiveUnavailable(str(exc).strip()) from exc


def _days(since: str | None, until: str | None) -> tuple[str, list[str]]:
    where, params = [], []
    if since is not None:
        where.append("day >= %s")
        params.append(since)
    if until is not None:
        where.append("day <= %s")
        params.append(until)
    return (" WHERE " + " AND ".join(where) if where else ""), params


_NAMES = ("day", "tenant", "tier", "route", "model")


async def aggregates(
    client: Client,
    url: str,
    since: str | None = None,
    until: str | None = None,
    group_by: Sequence[str] = _NAMES,
) -> dict[GroupKey, Row]:
    """``ledger_report.aggregates`` across both stores, with the same exact costs. Parts of the key
    not in ``group_by`` are "" — Postgres sums over them, so a report reads one row per group
    it shows (and price), not one per rollup row."""
    out: dict[GroupKey, Row] = {}
    keep = tuple(name in group_by for name in _NAMES)

    def project(key: GroupKey) -> GroupKey:
        return (*(part if k else "" for part, k in zip(key[:5], keep, strict=True)), *key[5:])

    columns = ", ".join(
        (
            ("to_char(day, 'YYYY-MM-DD')" if name == "day" else name) if k else "''"
            for name, k in zip(_NAMES, keep, strict=True)
        )
    )
    async with snapshot(url) as (conn, ack):
        where, params = _days(since, until)
        cur = await conn.execute(
            f"SELECT {columns}, price_input, price_output, price_cached_input, sum(requests)::bigint,"
            f" sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(cached_tokens)::bigint"
            f" FROM ledger_rollup{where} GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
            params,
        )
        for *key, requests, input_tokens, output_tokens, cached in await cur.fetchall():
            _add(out, tuple(key), requests, input_tokens, output_tokens, cached)
        for key, row in (await ledger_report.aggregates(client, since, until)).items():
            _add(out, project(key), row.requests, row.input_tokens, row.output_tokens, row.cached_tokens)
        async for rec in ledger_report.records(client, since, until, upto=format_id(ack)):
            key = project(ledger_report.group_key(rec))
            _add(out, key, -1, -rec.prompt_tokens, -rec.completion_tokens, -rec.cached_tokens)
    return ledger_report.price({k: r for k, r in out.items() if _counts(r) != (0, 0, 0, 0)})


def _counts(r: Row) -> tuple[int, int, int, int]:
    return r.requests, r.input_tokens, r.output_tokens, r.cached_tokens


def _add(out: dict[GroupKey, Row], key: GroupKey, requests: int, prompt: int, completion: int, cached: int) -> None:
    row = out.setdefault(key, Row())
    row.requests += requests
    row.input_tokens += prompt
    row.output_tokens += completion
    row.cached_tokens += cached


async def records(
    client: Client, url: str, since: str | None = None, until: str | None = None
) -> AsyncIterator[LedgerRecord]:
    """Every record of a day in [since, until]: the archived ones in write order, then Redis's."""
    ledger_report.check_day(since, "since")
    ledger_report.check_day(until, "until")
    async with snapshot(url) as (conn, ack):
        where, params = _days(since, until)
        async with conn.cursor(name="ledger_export") as cur:
            cur.itersize = ledger_report.PAGE
            await cur.execute(f"SELECT {_FIELDS} FROM ledger_records{where} ORDER BY stream_ms, stream_seq", params)
            async for row in cur:
                yield LedgerRecord(**dict(zip(LedgerRecord.__struct_fields__, row, strict=True)))
        async for rec in ledger_report.records(client, since, until, after=format_id(ack)):
            yield rec


async def verify(client: Client, url: str) -> list[str]:
    """Redis's stream against its aggregates, the archive's records against its rollup (in SQL), and
    no request id in both stores."""
    problems = await ledger_report.verify(client)
    group = "day, tenant, tier, route, model, price_input, price_output, price_cached_input"
    async with snapshot(url) as (conn, ack):
        cur = await conn.execute(
            f"SELECT to_char(day, 'YYYY-MM-DD'), tenant, tier, route, model,"
            f" s.requests, s.input_tokens, s.output_tokens, s.cached_tokens,"
            f" r.requests, r.input_tokens, r.output_tokens, r.cached_tokens"
            f" FROM (SELECT {group}, count(*) AS requests, sum(prompt_tokens)::bigint AS input_tokens,"
            f"       sum(completion_tokens)::bigint AS output_tokens, sum(cached_tokens)::bigint AS cached_tokens"
            f"       FROM ledger_records GROUP BY {group}) s"
            f" FULL OUTER JOIN ledger_rollup r USING ({group})"
            f" WHERE (s.requests, s.input_tokens, s.output_tokens, s.cached_tokens)"
            f"   IS DISTINCT FROM (r.requests, r.input_tokens, r.output_tokens, r.cached_tokens)"
            f" ORDER BY 1, 2, 3, 4, 5"
        )
        for day, tenant, tier, route, model, *counts in await cur.fetchall():
            problems.append(
                f"archive {day}/{tenant}/{tier}/{route}/{model}: records sum to {tuple(counts[:4])} "
                f"(requests, in, out, cached); the rollup says {tuple(counts[4:])}"
            )
        ids: list[str] = []
        async for rec in ledger_report.records(client, after=format_id(ack)):
            ids.append(rec.request_id)
            if len(ids) >= ledger_report.PAGE:
                problems += await _in_archive(conn, ids)
                ids = []
        problems += await _in_archive(conn, ids)
    return problems


async def _in_archive(conn: psycopg.AsyncConnection[Any], ids: list[str]) -> list[str]:
    if not ids:
        return []
    cur = await conn.execute("SELECT request_id FROM ledger_records WHERE request_id = ANY(%s)", (ids,))
    return [f"request {rid} is recorded in Redis and in the archive" for (rid,) in await cur.fetchall()]
