"""The ledger archive against a real Redis and a real Postgres: exactly once, trims only what
Postgres acknowledged, and reports/exports/verify give the same answers before and after."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from gateway import ledger_report
from gateway.archive import archiver, reader, schema
from gateway.ledger import DAYS, STREAM, Ledger, LedgerRecord, marker_key
from gateway.resp import RespConnection
from tests import pg
from tests.factories import ledger_record

DAY1 = 1_795_000_000.0  # 2026-11-18 (UTC)
DAY2 = DAY1 + 86_400
DAY3 = DAY2 + 86_400


def rec(n: int, *, t: float = DAY1, **kw: Any) -> LedgerRecord:
    return ledger_record(f"req-{n}", time=t + n, stream=n % 2 == 0, **kw)


def mixed(n: int, start: int = 0) -> list[LedgerRecord]:
    """Records over three days, two tenants, two tiers, odd prices, cached tokens, a None or two."""
    out = []
    for i in range(start, start + n):
        kw: dict[str, Any] = {"tenant": ("media", "ads")[i % 2], "prompt": 100 + i, "completion": 7 * i % 50}
        if i % 3 == 0:
            kw |= {"tier": "frontier", "price_in": "3.000001", "price_out": "15.2", "cached": i % 40}
            kw |= {"price_cached": "0.3"}
        if i % 5 == 0:
            kw |= {"ttfb_ms": None, "task": "summarize"}
        if i % 7 == 0:  # a shadow call's record: the comparison and the queue wait survive the archive
            kw |= {"tenant": "(platform)", "outcome": "shadow", "shadow_of": f"req-{i}x", "primary_tier": "frontier"}
            kw |= {"comparator": "exact", "score": 0.5, "agree": i % 2 == 0, "queue_wait_ms": 12.5}
            kw |= {"model_alias": "auto"}
        out.append(rec(i, t=(DAY1, DAY2, DAY3)[i * 3 // max(n + start, 1)], **kw))
    return out


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg.database() as url:
        yield url


@contextlib.asynccontextmanager
async def first_batch_copied(
    client: aioredis.Redis, url: str, size: int
) -> AsyncIterator[tuple[archiver.Archiver, archiver.Batch, archiver.StreamId]]:
    """An archiver that has read and copied its first batch (committed in Postgres, still in Redis);
    its connection closes on leaving, as if it died there."""
    conn = await archiver.connect(url)
    try:
        a = archiver.Archiver(client, conn, batch=size)
        start = await a.trimmed()
        batch = await a.read_batch(start, None)
        assert await a.copy(batch) == len(batch)
        yield a, batch, start
    finally:
        await conn.close()


async def everything(client: aioredis.Redis, url: str | None) -> tuple[Any, ...]:
    """What finance sees: reports by every grouping, the export, verify."""
    reports = [
        await ledger_report.report(client, ["day", "tenant", "tier", "route", "model"], archive=url),
        await ledger_report.report(client, ["tenant"], archive=url),
        await ledger_report.report(client, ["day"], since="2026-11-19", until="2026-11-19", archive=url),
    ]
    if url is None:
        exported = [r async for r in ledger_report.records(client)]
        problems = await ledger_report.verify(client)
    else:
        exported = [r async for r in reader.records(client, url)]
        problems = await reader.verify(client, url)
    return reports, exported, problems


async def test_migrations_apply_once_and_cover_every_record_field(pg_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        assert await schema.migrate(conn) == ["0001_ledger.sql", "0002_record_fields.sql"]
        assert await schema.migrate(conn) == []
        cur = await conn.execute("SELECT version, name FROM schema_version ORDER BY version")
        assert await cur.fetchall() == [(1, "0001_ledger.sql"), (2, "0002_record_fields.sql")]
        await conn.execute("ALTER TABLE ledger_records DROP COLUMN endpoint")
        with pytest.raises(RuntimeError, match="no column for endpoint: add a migration"):
            await schema.check_columns(conn)


async def test_archive_moves_records_and_totals_do_not_change(
    conns: tuple[RespConnection, aioredis.Redis], pg_url: str, tmp_path: Path
) -> None:
    resp, client = conns
    records = mixed(300)
    await Ledger(resp, str(tmp_path)).write(records)
    before = await everything(client, None)
    assert before[2] == []
    assert before == await everything(client, pg_url)  # nothing archived yet: the same answers

    progress = await archiver.archive(client, pg_url, before="2026-11-20", batch=37)
    on_day3 = sum(1 for r in records if r.day == "2026-11-20")
    assert (progress.read, progress.new, progress.trimmed) == (300 - on_day3, 300 - on_day3, 300 - on_day3)
    assert await client.xlen(STREAM) == on_day3  # only what Postgres acknowledged is gone
    assert sorted(d.decode() for d in await client.smembers(DAYS)) == ["2026-11-20"]  # emptied days leave Redis
    after = await everything(client, pg_url)
    assert after == before  # to the micro-dollar, record for record, in the same order

    progress = await archiver.archive(client, pg_url, before=None)
    assert progress.trimmed == on_day3
    assert await client.xlen(STREAM) == 0
    assert await everything(client, pg_url) == before
    assert await ledger_report.report(client, ["tenant"]) == []  # Redis alone no longer has them


async def test_crash_between_copy_and_trim_loses_nothing_and_doubles_nothing(
    conns: tuple[RespConnection, aioredis.Redis], pg_url: str, tmp_path: Path
) -> None:
    resp, client = conns
    await Ledger(resp, str(tmp_path)).write(mixed(120))
    before = await everything(client, None)
    async with first_batch_copied(client, pg_url, 50):
        pass  # the archiver dies here: committed in Postgres, still in Redis
    assert await client.xlen(STREAM) == 120
    assert await everything(client, pg_url) == before  # the overlap is counted once while it lasts

    progress = await archiver.archive(client, pg_url, before=None, batch=50)
    assert (progress.read, progress.new, progress.trimmed) == (120, 70, 120)
    assert await everything(client, pg_url) == before
    async with await psycopg.AsyncConnection.connect(pg_url) as check:
        cur = await check.execute("SELECT count(*), count(DISTINCT request_id) FROM ledger_records")
        assert await cur.fetchone() == (120, 120)


async def test_a_lost_trim_reply_is_not_applied_twice(
    conns: tuple[RespConnection, aioredis.Redis], pg_url: str, tmp_path: Path
) -> None:
    resp, client = conns
    await Ledger(resp, str(tmp_path)).write(mixed(40))
    before = await everything(client, None)
    async with first_batch_copied(client, pg_url, 25) as (a, batch, start):
        assert await a.trim(batch, start)
        assert await a.trim(batch, start)  # resent: the script sees the range trimmed and does nothing
    assert await client.xlen(STREAM) == 15
    assert await everything(client, pg_url) == before


async def test_records_written_during_and_after_archiving_are_counted_once(
    conns: tuple[RespConnection, aioredis.Redis], pg_url: str, tmp_path: Path
) -> None:
    resp, client = conns
    ledger = Ledger(resp, str(tmp_path))
    await ledger.write(mixed(60))
    await archiver.archive(client, pg_url, before=None, batch=16)
    await ledger.write(mixed(60))  # a replayed spool: every one of them is already recorded
    await ledger.write(mixed(30, start=60))  # and new ones, some of an archived day
    assert await client.xlen(STREAM) == 30
    rows = await ledger_report.report(client, ["tenant"], archive=pg_url)
    assert sum(r["requests"] for r in rows) == 90
    assert await reader.verify(client, pg_url) == []


async def test_a_second_archiver_is_refused(
    conns: tuple[RespConnection, aioredis.Redis], pg_url: str, tmp_path: Path
) -> None:
    resp, client = conns
    await Ledger(resp, str(tmp_path)).write(mixed(10))
    first = await archiver.connect(pg_url)
    try:
        await first.execute("SELECT pg_advisory_lock(%s)", (archiver.RUN_LOCK,))
        with pytest.raises(archiver.Busy):
            await archiver.archive(client, pg_url, before=None)
    finally:
        await first.close()
    assert await client.xlen(STREAM) == 10


async def test_a_reader_holds_back_the_trim_not_the_copy(
    conns: tuple[RespConnection, aioredis.Redis], pg_url: str, tmp_path: Path
) -> None:
    resp, client = conns
    await Ledger(resp, str(tmp_path)).write(mixed(30))
    before = await everything(client, None)
    async with reader.snapshot(pg_url), first_batch_copied(client, pg_url, 30) as (a, batch, start):
        assert not await a.trim(batch, start, wait_s=0.3)
    assert await client.xlen(STREAM) == 30
    assert await everything(client, pg_url) == before
    assert (await archiver.archive(client, pg_url, before=None)).trimmed == 30
    assert await everything(client, pg_url) == before


async def test_archive_verify_finds_a_rollup_that_disagrees(
    conns: tuple[RespConnection, aioredis.Redis], pg_url: str, tmp_path: Path
) -> None:
    resp, client = conns
    await Ledger(resp, str(tmp_path)).write([rec(1), rec(2)])
    await archiver.archive(client, pg_url, before=None)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("UPDATE ledger_rollup SET output_tokens = output_tokens + 5")
    assert await reader.verify(client, pg_url) == [
        "archive 2026-11-18/media/small/classify/m-small: records sum to (2, 200, 20, 0) "
        "(requests, in, out, cached); the rollup says (2, 200, 25, 0)"
    ]


async def test_a_record_written_again_after_its_marker_expired_is_archived_once(
    conns: tuple[RespConnection, aioredis.Redis], pg_url: str, tmp_path: Path
) -> None:
    resp, client = conns
    ledger = Ledger(resp, str(tmp_path))
    await ledger.write(mixed(20))
    await archiver.archive(client, pg_url, before=None)
    await client.delete(marker_key("req-3"))  # 35 days later, a spool replays req-3 again
    assert await ledger.write(mixed(20)[3:4]) == 1
    assert await reader.verify(client, pg_url) == ["request req-3 is recorded in Redis and in the archive"]
    progress = await archiver.archive(client, pg_url, before=None)
    assert (progress.read, progress.new, progress.trimmed) == (1, 0, 1)  # Postgres keeps the one it has
    assert await reader.verify(client, pg_url) == []
    rows = await ledger_report.report(client, ["tenant"], archive=pg_url)
    assert sum(r["requests"] for r in rows) == 20
