"""The ledger against a real Redis: exactly-once records, exact money, reports, export, verify, spool."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from gateway import ledger_report
from gateway.ledger import Ledger, LedgerRecord, agg_key
from gateway.policy.schema import Price
from gateway.resp import RespConnection
from gateway.store import connect
from tests.factories import ledger_record
from tests.procs import free_port

DAY1 = 1_795_000_000.0  # 2026-11-18 (UTC)
DAY2 = DAY1 + 86_400


def rec(n: int, *, t: float = DAY1, **kw: Any) -> LedgerRecord:
    """Record number ``n`` of a test: its own request id and second after ``t``."""
    return ledger_record(f"req-{n}", time=t + n, stream=n % 2 == 0, **kw)


async def test_records_are_written_once_however_often_they_are_sent(
    conns: tuple[RespConnection, aioredis.Redis], tmp_path: Path
) -> None:
    resp, client = conns
    ledger = Ledger(resp, str(tmp_path))
    batch = [rec(i) for i in range(10)]
    assert await ledger.write(batch) == 10
    assert await ledger.write(batch) == 0  # a retried write
    assert await ledger.write([*batch[:3], rec(10)]) == 1  # a replay overlapping new records
    rows = await ledger_report.report(client, ["day", "tenant", "tier"])
    assert rows == [
        {
            "day": "2026-11-18",
            "tenant": "media",
            "tier": "small",
            "requests": 11,
            "input_tokens": 1100,
            "output_tokens": 110,
            "cost_usd": Decimal("0.000154"),
            "cached_tokens": 0,
        }
    ]
    assert await ledger_report.verify(client) == []
    exported = [r async for r in ledger_report.records(client)]
    assert [r.request_id for r in exported] == [f"req-{i}" for i in range(11)]
    assert exported[0] == batch[0]  # every field comes back as it went in


async def test_money_is_exact(conns: tuple[RespConnection, aioredis.Redis], tmp_path: Path) -> None:
    resp, client = conns
    ledger = Ledger(resp, str(tmp_path))
    prices = ("0.123456789012", "15.987654321098")
    big = 10**12
    await ledger.write(
        [
            rec(1, prompt=big, completion=big + 7, price_in=prices[0], price_out=prices[1]),
            rec(2, prompt=3, completion=1, price_in=prices[0], price_out=prices[1]),
        ]
    )
    [row] = await ledger_report.report(client, ["tenant"])
    # by hand: 0.123456789012 x 1,000,000,000,003 + 15.987654321098 x 1,000,000,000,008, over a million
    assert row["cost_usd"] == Decimal("16111111.110238271604935820")
    numerator = Decimal(prices[0]) * (big + 3) + Decimal(prices[1]) * (big + 8)
    assert row["cost_usd"] * 1_000_000 == numerator  # nothing was rounded away


async def test_reports_group_and_render(conns: tuple[RespConnection, aioredis.Redis], tmp_path: Path) -> None:
    resp, client = conns
    ledger = Ledger(resp, str(tmp_path))
    await ledger.write(
        [
            rec(1),
            rec(2, tier="frontier", price_in="3", price_out="15", route="default"),
            rec(3, tenant="ads", t=DAY2),
            rec(4, t=DAY2),
        ]
    )
    by_tier = await ledger_report.report(client, ["tier"])
    assert [(r["tier"], r["requests"]) for r in by_tier] == [("frontier", 1), ("small", 3)]
    assert [r["day"] for r in await ledger_report.report(client, ["day"], since="2026-11-19")] == ["2026-11-19"]
    assert await ledger_report.report(client, ["day"], until="2026-11-17") == []
    csv_text = ledger_report.render(await ledger_report.report(client, ["tenant", "route"]), ["tenant", "route"], "csv")
    assert csv_text.splitlines()[0] == "tenant,route,requests,input_tokens,output_tokens,cost_usd"
    assert "media,default,1,100,10,0.00045" in csv_text
    table = ledger_report.render(by_tier, ["tier"], "table")
    assert "total: 4 requests" in table
    with pytest.raises(ValueError, match="cannot group by 'colour'"):
        await ledger_report.report(client, ["colour"])


async def test_verify_reports_any_difference(conns: tuple[RespConnection, aioredis.Redis], tmp_path: Path) -> None:
    resp, client = conns
    await Ledger(resp, str(tmp_path)).write([rec(1), rec(2)])
    await client.hincrby(agg_key("2026-11-18"), "media|small|classify|m-small|0.10|0.40|output", 5)
    problems = await ledger_report.verify(client)
    assert problems == [
        "2026-11-18/media/small/classify/m-small: records sum to 2 requests, 200 in, 20 out; aggregates say 2, 200, 25"
    ]


async def test_export_pages_through_the_stream(
    conns: tuple[RespConnection, aioredis.Redis], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resp, client = conns
    await Ledger(resp, str(tmp_path)).write([rec(i) for i in range(250)])
    monkeypatch.setattr(ledger_report, "PAGE", 7)
    ids = [r.request_id async for r in ledger_report.records(client)]
    assert ids == [f"req-{i}" for i in range(250)]


async def test_redis_away_spools_then_replays_exactly_once(redis_url: str, tmp_path: Path) -> None:
    dead = RespConnection(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    ledger = Ledger(dead, str(tmp_path))
    for i in range(5):
        ledger.record(rec(i))
    assert await ledger.flush() == 0
    spooled = (tmp_path / "ledger.spool.jsonl").read_text().splitlines()
    assert len(spooled) == 5
    ledger.record(rec(5))
    await ledger.flush()  # a replay was attempted too, and failed: the records wait in ".replaying"
    await ledger.flush()  # and again
    await dead.close()
    # the gateway restarts with Redis back: a new Ledger on the same spool directory replays it
    live = RespConnection(redis_url, timeout_s=2)
    client = connect(redis_url)
    try:
        restarted = Ledger(live, str(tmp_path))
        await restarted.write([rec(0)])  # one of them had in fact made it before (a write that timed out late)
        await restarted.flush()
        assert not (tmp_path / "ledger.spool.jsonl").exists() and not (tmp_path / "ledger.spool.replaying").exists()
        ids = [r.request_id async for r in ledger_report.records(client)]
        assert sorted(ids) == [f"req-{i}" for i in range(6)]
        assert await ledger_report.verify(client) == []
    finally:
        await live.close()
        await client.aclose()


def test_record_fields_round_trip() -> None:
    from gateway.ledger import _fields, from_fields

    original = rec(3)
    flat = _fields(original)
    assert from_fields(dict(zip(flat[::2], flat[1::2], strict=True))) == original


def test_records_from_before_the_endpoint_field_still_decode() -> None:
    from gateway.ledger import _fields, from_fields

    embedded = rec(4, endpoint="embeddings")
    flat = _fields(embedded)
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    assert from_fields(fields) == embedded
    del fields["endpoint"]  # a stream entry written by an older gateway
    assert from_fields(fields).endpoint == "chat"
    old_spool_line = msgspec.json.encode(rec(5)).replace(b',"endpoint":"chat"', b"")
    assert b"endpoint" not in old_spool_line
    assert msgspec.json.decode(old_spool_line, type=LedgerRecord).endpoint == "chat"


def test_records_from_before_cached_tokens_still_decode_and_keep_their_group() -> None:
    from gateway.ledger import _fields, from_fields

    plain = rec(6)
    flat = _fields(plain)
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    del fields["cached_tokens"], fields["price_cached_input"]  # a stream entry written by an older gateway
    old = from_fields(fields)
    assert (old.cached_tokens, old.price_cached_input) == (0, "") and old == plain
    assert old.group() == "media|small|classify|m-small|0.10|0.40"  # the aggregate field names of old
    old_spool_line = msgspec.json.encode(plain).replace(b',"cached_tokens":0,"price_cached_input":""', b"")
    assert b"cached" not in old_spool_line
    assert msgspec.json.decode(old_spool_line, type=LedgerRecord) == plain
    assert rec(7, cached=64, price_cached="0.025").group() == "media|small|classify|m-small|0.10|0.40|0.025"


def test_cached_tokens_are_billed_at_the_cached_price_exactly() -> None:
    p_in, p_out, p_cached = Decimal("0.123456789012"), Decimal("15.987654321098"), Decimal("0.012345678901")
    price, uncached = Price(p_in, p_out, cached_input=p_cached), Price(p_in, p_out)
    big = 10**12
    billed = price.cost(big + 5, 7, big)
    assert billed * 1_000_000 == p_in * 5 + p_cached * big + p_out * 7  # nothing rounded away
    assert uncached.cost(500, 7, 384) == uncached.cost(500, 7)  # no cached price: all input
    assert price.cost(500, 7, 0) == uncached.cost(500, 7)  # nothing cached: unchanged


async def test_aggregates_price_cached_tokens_exactly(
    conns: tuple[RespConnection, aioredis.Redis], tmp_path: Path
) -> None:
    resp, client = conns
    ledger = Ledger(resp, str(tmp_path))
    batch = [
        rec(1, prompt=480, completion=3, cached=384, price_cached="0.025"),
        rec(2, prompt=480, completion=3, cached=0, price_cached="0.025"),
        rec(3, prompt=10**12 + 1, completion=9, cached=10**12, price_cached="0.000000000007"),
        rec(4, prompt=480, completion=3, cached=384),  # a tier without a cached price: billed as input
        rec(5, prompt=480, completion=3),  # an old-style record
    ]
    assert await ledger.write(batch) == 5
    rows = await ledger_report.report(client, ["tenant"])
    assert rows[0]["cost_usd"] == sum((Decimal(r.cost_usd) for r in batch), Decimal(0))  # exact
    assert rows[0]["cached_tokens"] == 384 + 10**12 + 384
    assert rows[0]["input_tokens"] == 4 * 480 + 10**12 + 1
    assert await ledger_report.verify(client) == []
    stored = await client.hgetall(agg_key("2026-11-18"))
    assert stored[b"media|small|classify|m-small|0.10|0.40|0.025|cached"] == b"384"
    assert stored[b"media|small|classify|m-small|0.10|0.40|cached"] == b"384"
    # verify notices aggregates that disagree with the records, cached tokens included
    await client.hincrby(agg_key("2026-11-18"), "media|small|classify|m-small|0.10|0.40|0.025|cached", 1)
    assert "385" in " ".join(await ledger_report.verify(client))
