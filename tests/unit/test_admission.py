"""Admission against a real Redis: key names, the Lua scripts, and the scripts against a model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission import MINUTE_US, AdmitCall, Admitter, Gcra, Item, Kind, duration, plan, rate_limit_headers
from gateway.auth import Principal
from gateway.errors import RateLimited, StateUnavailable
from gateway.facts import RequestFacts
from gateway.policy import RoutingDecision, parse
from gateway.resp import RespConnection
from gateway.store import connect, script

POLICY = parse(
    """version: 1
tiers:
  small: {model: s, price: {input: 1, output: 1}, default_max_tokens: 50}
  frontier: {model: f, price: {input: 1, output: 1}}
routes:
  - {name: r, tier: small}
limits:
  - {scope: tenant, rpm: 3, tpm: 1000, concurrency: 2}
  - {scope: tier, tier: frontier, tpm: 100000}
  - {scope: key, tenant: batch, rpm: 60}
  - {scope: tenant+tier, concurrency: 5}
  - {scope: tier, rpm: 500}
""",
    "p.yaml",
)
ALICE = Principal("key_a", "alice")
BATCH = Principal("key_b", "batch")


def facts(prompt: int = 10, max_tokens: int | None = 20, tenant: str = "alice") -> RequestFacts:
    return RequestFacts(tenant, None, "auto", prompt, max_tokens, False, {})


def decision(tier: str = "small") -> RoutingDecision:
    return RoutingDecision(POLICY.revision, "r", tier, ())


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[RespConnection]:
    c = RespConnection(redis_url)
    yield c
    await c.close()


RIDS = iter(f"req{i}" for i in range(10**6))


def test_plan_names_every_key_with_a_tenant_or_tier_hash_tag() -> None:
    items = plan(POLICY, BATCH, "frontier", 30, 600_000_000)
    assert [(i.kind, i.key, i.limit, i.cost) for i in items] == [
        ("r", "gw:{t:batch}:rl:0:tenant:r", 3, 1),
        ("t", "gw:{t:batch}:rl:0:tenant:t", 1000, 30),
        ("c", "gw:{t:batch}:rl:0:tenant:c", 2, 1),
        ("t", "gw:{tier:frontier}:rl:1:t", 100000, 30),
        ("r", "gw:{t:batch}:rl:2:key:key_b:r", 60, 1),
        ("c", "gw:{t:batch}:rl:3:tier:frontier:c", 5, 1),
        ("r", "gw:{tier:frontier}:rl:4:r", 500, 1),
    ]
    # filters: the frontier-only limit and the batch-only limit do not apply to alice on small
    assert [i.key for i in plan(POLICY, ALICE, "small", 30, 1)] == [
        "gw:{t:alice}:rl:0:tenant:r",
        "gw:{t:alice}:rl:0:tenant:t",
        "gw:{t:alice}:rl:0:tenant:c",
        "gw:{t:alice}:rl:3:tier:small:c",
        "gw:{tier:small}:rl:4:r",
    ]
    # braces in a tenant name cannot break out of the hash tag
    assert plan(POLICY, Principal("k", "ev{il}"), "small", 1, 1)[0].key == "gw:{t:ev_il_}:rl:0:tenant:r"


async def test_reserve_exactly_the_limit_then_429_with_headers(conn: RespConnection) -> None:
    adm = Admitter(conn)
    for expected_remaining in (2, 1, 0):
        a = await adm.reserve(POLICY, ALICE, facts(max_tokens=None), decision(), next(RIDS))
        assert a.reserved_tokens == 10 + 50  # the tier's default_max_tokens when none is given
        assert a.headers["x-ratelimit-limit-requests"] == "3"
        assert a.headers["x-ratelimit-remaining-requests"] == str(expected_remaining)
        assert a.headers["x-ratelimit-limit-tokens"] == "1000"
        adm.settle(a, 60)
        await adm.flush()
    with pytest.raises(RateLimited) as info:
        await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))
    err = info.value
    assert err.status == 429 and err.limit_type == "requests"
    assert int(err.headers["retry-after"]) >= 1 and int(err.headers["retry-after-ms"]) > 0
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    # another tenant has its own counters
    await adm.reserve(POLICY, BATCH, facts(), decision(), next(RIDS))


async def test_rejection_reserves_nothing(client: aioredis.Redis, conn: RespConnection) -> None:
    adm = Admitter(conn)
    await adm.reserve(POLICY, ALICE, facts(prompt=590, max_tokens=10), decision(), next(RIDS))  # 600 of 1000 tpm
    with pytest.raises(RateLimited) as info:
        await adm.reserve(POLICY, ALICE, facts(prompt=490, max_tokens=10), decision(), next(RIDS))  # 1100 > 1000
    assert info.value.limit_type == "tokens"
    b = await adm.reserve(POLICY, ALICE, facts(prompt=10, max_tokens=20), decision(), next(RIDS))
    assert b.headers["x-ratelimit-remaining-requests"] == "1"  # 3 rpm: the refused request took none
    assert await client.zcard("gw:{t:alice}:rl:0:tenant:c") == 2  # nor a concurrency slot


async def test_concurrency_slots_are_held_until_settled(conn: RespConnection) -> None:
    adm = Admitter(conn)
    a1 = await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))
    a2 = await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))
    with pytest.raises(RateLimited, match="2 concurrent requests"):
        await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))
    adm.settle(a1, 30)  # the slot's release is sent at once, ahead of the next admission: no flush needed
    a3 = await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))
    assert await conn.call("ZCARD", "gw:{t:alice}:rl:0:tenant:c") == 2
    for a in (a2, a3):
        adm.settle(a, None)
    assert await conn.call("ZCARD", "gw:{t:alice}:rl:0:tenant:c") == 0


async def test_slots_of_a_dead_gateway_expire(conn: RespConnection) -> None:
    adm = Admitter(conn, reservation_ttl_s=0.2)
    await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))
    await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))  # never settled: the gateway "died"
    with pytest.raises(RateLimited):
        await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))
    await asyncio.sleep(0.25)
    await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))


async def test_settle_refunds_unused_tokens(conn: RespConnection) -> None:
    adm = Admitter(conn)
    policy = parse(
        "version: 1\ntiers:\n  t: {model: m, price: {input: 1, output: 1}}\nroutes:\n  - {name: r, tier: t}\n"
        "limits:\n  - {scope: tenant, tpm: 100}\n",
        "p.yaml",
    )
    d = RoutingDecision(policy.revision, "r", "t", ())
    a = await adm.reserve(policy, ALICE, facts(prompt=10, max_tokens=80), d, next(RIDS))  # 90 of 100
    with pytest.raises(RateLimited):
        await adm.reserve(policy, ALICE, facts(prompt=10, max_tokens=10), d, next(RIDS))
    adm.settle(a, 15)  # it used 15: 75 come back
    await adm.flush()
    b = await adm.reserve(policy, ALICE, facts(prompt=10, max_tokens=70), d, next(RIDS))
    assert int(b.headers["x-ratelimit-remaining-tokens"]) <= 5


async def test_redis_down_fail_closed_and_fail_open(tmp_path: object) -> None:
    from tests.procs import free_port

    dead = RespConnection(f"redis://127.0.0.1:{free_port()}/0")
    adm = Admitter(dead)
    with pytest.raises(StateUnavailable):
        await adm.reserve(POLICY, ALICE, facts(), decision(), next(RIDS))
    open_policy = parse(
        "version: 1\non_redis_error: fail_open\nexpected_replicas: 2\n"
        "tiers:\n  t: {model: m, price: {input: 1, output: 1}}\nroutes:\n  - {name: r, tier: t}\n"
        "limits:\n  - {scope: tenant, rpm: 6}\n",
        "p.yaml",
    )
    d = RoutingDecision(open_policy.revision, "r", "t", ())
    admitted = 0
    for _ in range(5):
        try:
            a = await adm.reserve(open_policy, ALICE, facts(), d, next(RIDS))
            assert a.local
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 3  # 6 rpm across 2 expected replicas: 3 here
    await dead.close()


def test_duration_and_headers() -> None:
    assert [duration(x) for x in (0, 20_000, 1_500_000, 360_000_000)] == ["0ms", "20ms", "1.5s", "6m0s"]
    items = (
        Item(Kind.REQUESTS, "a", 10, MINUTE_US, 1),
        Item(Kind.REQUESTS, "b", 5, MINUTE_US, 1),
        Item(Kind.TOKENS, "c", 100, MINUTE_US, 0),
    )
    compiled = AdmitCall(items, "0" * 40, 1)
    reply = [1, 0, 0, 0, 9, 6_000_000, 4, 12_000_000, 93, 4_200_000]
    assert rate_limit_headers(compiled, reply) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "12s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "93",
        "x-ratelimit-reset-tokens": "4.2s",
    }


# --- the scripts against the model --------------------------------------------------------------

op = st.one_of(
    st.tuples(st.just("admit"), st.integers(1, 40), st.integers(0, 3)),  # cost, which key set
    st.tuples(st.just("settle"), st.integers(-10, 40), st.integers(0, 3)),  # refund, which reservation
    st.tuples(st.just("sleep"), st.integers(0, 30), st.just(0)),  # milliseconds
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=25), limit=st.integers(1, 60))
async def test_scripts_agree_with_the_model(redis_url: str, ops: list[tuple[str, int, int]], limit: int) -> None:
    """Replay random traffic through the Lua scripts and through ``Gcra`` at the times Redis used."""
    client = connect(redis_url, timeout_s=2)
    await client.flushdb()
    admit, settle = script(client, "admit"), script(client, "settle")
    model = Gcra()
    period = 200_000  # a 200 ms window keeps sleeps short
    reserved: list[tuple[tuple[Item, ...], str]] = []
    for n, (kind, x, which) in enumerate(ops):
        if kind == "sleep":
            await asyncio.sleep(x / 1000)
            continue
        if kind == "admit":
            items = (
                Item(Kind.REQUESTS, f"k{which}:r", limit, period, 1),
                Item(Kind.TOKENS, f"k{which}:t", limit * 10, period, x),
                Item(Kind.CONCURRENCY, f"k{which}:c", max(1, limit // 10), period, 1),
            )
            rid = f"r{n}"
            args: list[str | int] = [rid, period]
            for i in items:
                args += [i.kind, i.limit, i.period_us, i.cost]
            res = await admit(keys=[i.key for i in items], args=args)
            now = int(res[3])
            ok, failing = model.admit(items, rid, period, now=now)
            assert (bool(res[0]), int(res[1])) == (ok, failing)
            if ok:
                reserved.append((items, rid))
            for item in items:
                if item.kind == "t":
                    # a full bucket is a deleted key in Redis and a time <= now in the model: the same state
                    stored = await client.get(item.key)
                    modelled = model.tat.get(item.key)
                    if stored is None:
                        assert modelled is None or modelled <= now, item
                    else:
                        assert int(stored) == modelled, item
        elif reserved:
            items, rid = reserved.pop(which % len(reserved))
            refunds = tuple(x if i.kind == "t" else 0 for i in items)
            sargs: list[str | float | int] = []
            for item, refund in zip(items, refunds, strict=True):
                sargs += [rid, item.kind, item.emission_us, refund]
            now = int(await settle(keys=[i.key for i in items], args=sargs))
            model.settle(items, rid, refunds, now=now)
    await client.aclose()
