"""GPU-hour cost against a real Redis: up time from the registry and health streaks, busy time and
use from the ledger, and an allocation that adds up to worker-hours x price to the micro-dollar."""

from __future__ import annotations

import asyncio
import datetime
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import gpu_cost, registry, uptime
from gateway.gpu_cost import HOUR_MS, TierDay, _Use, allocate, price_day
from gateway.ledger import Ledger, LedgerRecord
from gateway.policy import parse
from gateway.policy.schema import GpuHour
from gateway.resp import RespConnection
from gateway.store import connect
from tests.factories import ledger_record
from tests.procs import gateway_cli

DAY = "2026-11-18"
T0 = datetime.datetime(2026, 11, 18, tzinfo=datetime.UTC).timestamp()
MIN = 60.0

POLICY = """version: 1
tiers:
  small:
    model: m-small
    gpu_hour: {usd: 2.50, gpus_per_worker: 2}
  big:
    model: m-big
    price: {input: 3, output: 15}
    gpu_hour: {usd: 1.10, gpus_per_worker: 1}
  tokens:
    model: m-tokens
    price: {input: 1, output: 1}
routes:
  - name: default
    tier: small
"""


def rec(n: int, at_min: float, latency_min: float, tenant: str, tier: str, worker: str, p: int, c: int) -> LedgerRecord:
    return ledger_record(
        f"r{n}",
        time=T0 + at_min * MIN,
        latency_ms=latency_min * MIN * 1000,
        tenant=tenant,
        tier=tier,
        worker=worker,
        prompt=p,
        completion=c,
        price_in="0",
        price_out="0",
    )


async def two_tier_day(resp: RespConnection, client: aioredis.Redis, tmp_path: Path) -> None:
    """small (2 GPUs at $2.50): w1 up 00:00-02:00 (registered), w2 up 01:00-01:30 in two health
    streaks recorded by two replicas that overlap; big ($1.10): w3 up 00:00-00:20."""
    await uptime.record(client, "small", "http://w1", T0, T0 + 110 * MIN)  # heartbeats, as registry.beat records
    await uptime.record(client, "small", "http://w1", T0, T0 + 120 * MIN)  # its last heartbeat
    await uptime.record(client, "small", "http://w2", T0 + 60 * MIN, T0 + 80 * MIN)
    await uptime.record(client, "small", "http://w2", T0 + 70 * MIN, T0 + 90 * MIN)  # another replica's view
    await uptime.record(client, "big", "http://w3", T0, T0 + 20 * MIN)
    await uptime.record(client, "big", "http://w3", T0 - 3600, T0 - 60)  # the day before: not this day
    await Ledger(resp, str(tmp_path)).write(
        [
            rec(1, 10, 10, "a", "small", "http://w1", 100, 50),  # weight 100 + 4 x 50 = 300
            rec(2, 15, 10, "b", "small", "http://w1", 50, 25),  # weight 150; busy together 00:10-00:25
            rec(3, 5, 5, "c", "big", "http://w3", 10, 0),
            rec(4, 30, 1, "c", "tokens", "http://w9", 10, 0),  # a tier priced per token only: not here
        ]
    )


async def test_a_day_with_two_gpu_priced_tiers_adds_up_exactly(
    conns: tuple[RespConnection, aioredis.Redis], tmp_path: Path
) -> None:
    resp, client = conns
    await two_tier_day(resp, client, tmp_path)
    days = await gpu_cost.report(client, parse(POLICY), DAY, DAY)
    assert days == [
        TierDay(
            day=DAY,
            tier="big",
            usd_per_gpu_hour=Decimal("1.10"),
            gpus_per_worker=1,
            worker_ms=20 * 60_000,
            # 1/3 h x $1.10 = 366,666.67 micro-dollars: rounded once; c's 5 busy minutes are 91,666.67
            total_micro=366_667,
            idle_micro=275_000,
            tenants={"c": 91_667},
        ),
        TierDay(
            day=DAY,
            tier="small",
            usd_per_gpu_hour=Decimal("2.50"),
            gpus_per_worker=2,
            worker_ms=150 * 60_000,  # w1 2 h + w2 30 min (its two views merged)
            total_micro=12_500_000,  # 2.5 h x 2 GPUs x $2.50
            # 15 busy minutes of w1 (00:10-00:25) are $1.25, split 300:150 between a and b
            idle_micro=11_250_000,
            tenants={"a": 833_333, "b": 416_667},
        ),
    ]
    for d in days:
        assert d.used_micro + d.idle_micro == d.total_micro
    with pytest.raises(ValueError, match="at most 366 days at a time"):
        await gpu_cost.report(client, parse(POLICY), "2025-01-01", "2026-01-02")
    with pytest.raises(ValueError, match=r"since \(2026-01-02\) is after until \(2026-01-01\)"):
        await gpu_cost.report(client, parse(POLICY), "2026-01-02", "2026-01-01")


def test_a_request_across_an_hour_counts_in_both_hours() -> None:
    use = _Use()
    use.add(rec(1, 50, 20, "a", "small", "w", 100, 0))  # 00:50-01:10, weight 100
    use.add(rec(2, 65, 1, "b", "small", "w", 50, 0))  # 01:05-01:06, weight 50
    assert use.use[("w", int(T0 * 1000))] == {"a": Fraction(50)}
    assert use.use[("w", int(T0 * 1000) + HOUR_MS)] == {"a": Fraction(50), "b": Fraction(50)}
    up = {"w": [(int(T0 * 1000), int(T0 * 1000) + 2 * HOUR_MS)]}
    day = price_day(DAY, "small", GpuHour(Decimal(60), 1), up, use)  # $1 a minute: easy to check
    # hour 0: 10 busy minutes, all a's; hour 1: 10 busy minutes (01:00-01:10), half a's, half b's
    assert (day.tenants, day.idle_micro, day.total_micro) == (
        {"a": 15_000_000, "b": 5_000_000},
        100_000_000,
        120_000_000,
    )


def test_up_time_without_requests_is_all_idle_and_no_up_time_costs_nothing() -> None:
    up = {"w": [(int(T0 * 1000), int(T0 * 1000) + 1)]}  # one millisecond at $2.50 an hour
    day = price_day(DAY, "t", GpuHour(Decimal("2.50"), 1), up, _Use())
    assert (day.total_micro, day.idle_micro, day.tenants) == (1, 1, {})  # 0.69 micro-dollars, rounded once
    day = price_day(DAY, "t", GpuHour(Decimal("2.50"), 1), {}, _Use())
    assert (day.total_micro, day.idle_micro, day.worker_ms) == (0, 0, 0)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=3), st.fractions(min_value=0, max_value=10**9), max_size=8))
def test_allocation_loses_and_invents_nothing(parts: dict[str, Fraction]) -> None:
    total = round(sum(parts.values(), Fraction(0)))
    out = allocate(total, parts)
    assert sum(out.values()) == total
    assert all(abs(out[k] - v) < 1 for k, v in parts.items())  # no part moves by a whole micro-dollar


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1439), st.integers(1, 600)), max_size=4),
    st.lists(
        st.tuples(st.integers(0, 1439), st.integers(0, 90), st.sampled_from("abc"), st.integers(0, 5000)),
        max_size=25,
    ),
    st.decimals(min_value=0, max_value=50, places=6),
    st.integers(1, 8),
)
def test_allocated_plus_idle_is_worker_hours_times_price(
    spans: list[tuple[int, int]], requests: list[tuple[int, int, str, int]], usd: Decimal, gpus: int
) -> None:
    base = int(T0 * 1000)
    up = {"w": [(base + s * 60_000, min(base + (s + n) * 60_000, base + 24 * HOUR_MS)) for s, n in spans]}
    up["w"] = [(int(s), int(e)) for s, e in uptime.merge([(float(s), float(e)) for s, e in up["w"]])]
    use = _Use()
    for i, (at, latency, tenant, tokens) in enumerate(requests):
        use.add(rec(i, at, latency, tenant, "t", "w", tokens, tokens // 3))
    day = price_day(DAY, "t", GpuHour(usd, gpus), up, use)
    exact = Fraction(usd) * 10**6 * gpus * day.worker_ms / HOUR_MS
    assert day.used_micro + day.idle_micro == day.total_micro == round(exact)
    assert min([day.idle_micro, *day.tenants.values()], default=0) >= 0


async def test_a_heartbeat_records_up_time_from_registration(redis_url: str) -> None:
    client = connect(redis_url, timeout_s=5)
    try:
        reg = registry.Registration("http://w1", "m", "small", T0)
        await registry.beat(client, reg)
        found = await uptime.intervals(client, "small", T0 - 10, 2e10)
        assert list(found) == ["http://w1"]
        [(start, end)] = found["http://w1"]
        assert start == T0 and abs(end - time.time()) < 60  # registered then, seen now
    finally:
        await client.aclose()


def test_health_streaks_become_intervals() -> None:
    s = uptime.Streaks(gap_s=10)
    assert s.sample([("t", "u")], 100) == [("t", "u", 100, 100)]
    assert s.sample([("t", "u")], 105) == [("t", "u", 100, 105)]
    assert s.sample([], 110) == []
    assert s.sample([("t", "u")], 130) == [("t", "u", 130, 130)]  # down in between: a new interval


async def test_cli_reports_gpu_cost(conns: tuple[RespConnection, aioredis.Redis], tmp_path: Path) -> None:
    resp, client = conns
    await two_tier_day(resp, client, tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    kw = client.connection_pool.connection_kwargs
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{kw['port']}/0"}
    args = ["ledger", "report", "--cost", "gpu", "--policy", str(policy), "--since", DAY, "--until", DAY]
    out = (await asyncio.to_thread(gateway_cli, env, *args, check=True)).stdout
    assert out.splitlines() == [
        "day         tier   tenant   cost_usd",
        "2026-11-18  big    c        0.091667",
        "2026-11-18  big    (idle)   0.275000",
        "2026-11-18  small  a        0.833333",
        "2026-11-18  small  b        0.416667",
        "2026-11-18  small  (idle)  11.250000",
        "2026-11-18 big: 0.333 worker-hours x 1 GPU x $1.10 = $0.366667 = used $0.091667 + idle $0.275000",
        "2026-11-18 small: 2.500 worker-hours x 2 GPUs x $2.50 = $12.500000 = used $1.250000 + idle $11.250000",
    ]
