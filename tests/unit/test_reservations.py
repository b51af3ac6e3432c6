"""Reservations that cannot leak, against a real redis-server that is stalled (DEBUG SLEEP),
killed and restarted under the admitter: every counter comes back to what the requests in flight
explain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis

from gateway.admission import Admitter
from gateway.auth import Principal
from gateway.errors import BudgetExceeded, RateLimited, StateUnavailable, TooLargeForLimit
from gateway.facts import RequestFacts
from gateway.policy import RoutingDecision, parse
from gateway.resp import RespConnection
from tests.procs import RedisServer

LIMITS = """version: 1
tiers:
  t: {model: m, price: {input: 1, output: 1}}
routes:
  - {name: r, tier: t}
limits:
  - {scope: tenant, rpm: 5, tpm: 1000, concurrency: 3}
"""
POLICY = parse(LIMITS, "p.yaml")
OPEN = parse(LIMITS.replace("version: 1\n", "version: 1\non_redis_error: fail_open\n"), "p.yaml")
ALICE = Principal("key_a", "alice")
FACTS = RequestFacts("alice", None, "auto", 10, 20, False, {})
SLOTS = "gw:{t:alice}:rl:0:tenant:c"
REQUESTS = "gw:{t:alice}:rl:0:tenant:r"


def decision(policy=POLICY) -> RoutingDecision:  # type: ignore[no-untyped-def]
    return RoutingDecision(policy.revision, "r", "t", ())


@pytest.fixture
def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    s = RedisServer(tmp_path, debug=True)
    yield s  # type: ignore[misc]
    s.stop()


def stall(server: RedisServer, seconds: float) -> None:
    """Make Redis unresponsive for ``seconds`` (from another connection, in the background)."""
    client = redis.Redis(port=server.port)
    client.execute_command("CLIENT", "SETNAME", "staller")
    import threading

    threading.Thread(target=lambda: (client.execute_command("DEBUG", "SLEEP", seconds), client.close())).start()


async def until(cond: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def awake(conn: RespConnection) -> None:
    while True:
        try:
            await conn.call("PING")
            return
        except TimeoutError:
            pass


async def warm_up(adm: Admitter, policy=POLICY) -> None:  # type: ignore[no-untyped-def]
    """Load the script (a stalled Redis would answer NOSCRIPT late: nothing to release) and the
    connection; the request is given back whole."""
    adm.settle(await adm.reserve(policy, ALICE, FACTS, decision(policy), "warm-up"), 0, 0, reached=False)
    await adm.flush()


def zcard(server: RedisServer, key: str) -> int:
    with redis.Redis(port=server.port, socket_timeout=10) as c:
        return int(c.zcard(key))


async def test_a_reply_that_came_too_late_releases_its_reservation(server: RedisServer) -> None:
    conn = RespConnection(server.url, timeout_s=0.25)
    adm = Admitter(conn, timeout_s=0.25)
    settler = asyncio.create_task(adm.run_settler())
    try:
        await conn.call("SCRIPT", "LOAD", adm._admit.source)  # loaded, but no reply yet told the clock
        assert adm.clock.deadline(0, 1) == 0  # so the call carries no deadline
        stall(server, 1.0)
        await asyncio.sleep(0.1)  # the stall has begun
        with pytest.raises(StateUnavailable):  # fail_closed: refused, although Redis will run the script
            await adm.reserve(POLICY, ALICE, FACTS, decision(), "late-1")
        # Redis wakes up, runs the admission, and its reply (admitted) is released at once
        await until(lambda: adm.released == 1)
        await until(lambda: zcard(server, SLOTS) == 0)
        # the whole limit is usable: 3 concurrent, and the refused request consumed no rpm either
        held = [await adm.reserve(POLICY, ALICE, FACTS, decision(), f"ok-{i}") for i in range(3)]
        with pytest.raises(RateLimited, match="concurrent"):
            await adm.reserve(POLICY, ALICE, FACTS, decision(), "ok-3")
        for a in held:
            adm.settle(a, 30)
        await until(lambda: zcard(server, SLOTS) == 0)
        held = [await adm.reserve(POLICY, ALICE, FACTS, decision(), f"ok2-{i}") for i in range(2)]
        with pytest.raises(RateLimited, match="requests per minute"):  # 5 rpm: 3 + 2 used, the late one not
            await adm.reserve(POLICY, ALICE, FACTS, decision(), "ok2-2")
    finally:
        settler.cancel()
        await conn.close()


async def test_fail_open_during_a_stall_leaves_nothing_behind(server: RedisServer) -> None:
    conn = RespConnection(server.url, timeout_s=0.25)
    adm = Admitter(conn, timeout_s=0.25)
    settler = asyncio.create_task(adm.run_settler())
    try:
        await warm_up(adm, OPEN)  # the clock is known: the calls carry deadlines
        stall(server, 1.0)
        await asyncio.sleep(0.1)
        local = await asyncio.gather(*(adm.reserve(OPEN, ALICE, FACTS, decision(OPEN), f"o-{i}") for i in range(3)))
        assert all(a.local for a in local)
        await awake(conn)  # Redis has run the three admissions (in order, before the PING): past their deadline
        assert adm.released == 0  # ... so they reserved nothing, and there was nothing to release
        for a in local:
            adm.settle(a, 30)
        await until(lambda: zcard(server, SLOTS) == 0)
        with redis.Redis(port=server.port) as c:
            assert c.get(REQUESTS) is None  # the request counter too: nothing was served through Redis
    finally:
        settler.cancel()
        await conn.close()


async def test_a_lost_connection_releases_the_slots_and_a_killed_gateway_frees_them_within_the_ttl(
    server: RedisServer,
) -> None:
    conn = RespConnection(server.url, timeout_s=0.25)
    adm = Admitter(conn, timeout_s=0.25, reservation_ttl_s=1.0)
    renewals = asyncio.create_task(adm.run_renewals())
    try:
        held = await adm.reserve(POLICY, ALICE, FACTS, decision(), "held")
        await asyncio.sleep(1.5)  # longer than the TTL: renewed while in flight
        assert zcard(server, SLOTS) == 1
        adm.settle(held, 30)  # sent at once; NOSCRIPT (a fresh Redis) queues it for the batch, which loads it
        await conn.call("PING")
        await adm.flush()
        assert zcard(server, SLOTS) == 0
        # A gateway that dies holding a slot: nobody renews it, it is gone within the TTL
        orphan = Admitter(conn, reservation_ttl_s=1.0)
        await orphan.reserve(POLICY, ALICE, FACTS, decision(), "orphan")
        assert zcard(server, SLOTS) == 1
        started = time.monotonic()
        await until(lambda: _no_live_slot(server), within=5)
        assert time.monotonic() - started < 2.0
    finally:
        renewals.cancel()
        await conn.close()


def _no_live_slot(server: RedisServer) -> bool:
    """Expired slots leave the set when the next admission looks (ZREMRANGEBYSCORE); count live ones."""
    with redis.Redis(port=server.port) as c:
        now = c.time()
        return int(c.zcount(SLOTS, now[0] * 1_000_000 + now[1], "+inf")) == 0


async def test_a_request_that_never_reached_a_worker_costs_no_quota(server: RedisServer) -> None:
    conn = RespConnection(server.url)
    adm = Admitter(conn)
    try:
        for i in range(10):  # twice the rpm: each refused before a worker (say, no healthy worker)
            a = await adm.reserve(POLICY, ALICE, FACTS, decision(), f"nw-{i}")
            adm.settle(a, 0, 0, reached=False)
            await adm.flush()
        served = [await adm.reserve(POLICY, ALICE, FACTS, decision(), f"s-{i}") for i in range(3)]
        for a in served:
            adm.settle(a, 30)
        await adm.flush()
        await adm.reserve(POLICY, ALICE, FACTS, decision(), "s-3")
        await adm.reserve(POLICY, ALICE, FACTS, decision(), "s-4")
        with pytest.raises(RateLimited, match="requests per minute"):
            await adm.reserve(POLICY, ALICE, FACTS, decision(), "s-5")
    finally:
        await conn.close()


async def test_fail_open_still_refuses_a_spent_budget(server: RedisServer) -> None:
    budget = parse(
        LIMITS.replace("version: 1\n", "version: 1\non_redis_error: fail_open\n")
        + "budgets:\n  - {tenant: alice, daily_usd: 0.0001, action: reject}\n",
        "b.yaml",
    )
    conn = RespConnection(server.url)
    adm = Admitter(conn)
    try:
        for i in range(2):  # 30 tokens at $1/M each: $0.00006 of $0.0001
            await adm.reserve(budget, ALICE, FACTS, decision(budget), f"b-{i}")
        assert (await adm.budget_used_pct(budget))["alice"] == 60
        await asyncio.to_thread(server.stop)
        third = await adm.reserve(budget, ALICE, FACTS, decision(budget), "b-2")  # $0.00009: still within
        assert third.local
        with pytest.raises(BudgetExceeded):  # $0.00012: over, known from the last read plus what came since
            await adm.reserve(budget, ALICE, FACTS, decision(budget), "b-3")
    finally:
        await conn.close()


async def test_a_wrong_clock_never_refuses_an_admission(server: RedisServer) -> None:
    conn = RespConnection(server.url)
    adm = Admitter(conn)
    try:
        await warm_up(adm)
        assert adm.clock.deadline(0, 0) != 0
        adm.clock.best = adm.clock.previous = -10_000_000  # ten seconds off: every deadline is long past
        a = await adm.reserve(POLICY, ALICE, FACTS, decision(), "wrong-clock")  # expired, asked again: admitted
        assert a.items and not a.local
    finally:
        await conn.close()


async def test_n_and_best_of_count_in_tokens_and_budgets(server: RedisServer) -> None:
    budget = parse(
        LIMITS.replace("rpm: 5, tpm: 1000, concurrency: 3", "tpm: 1000")
        + "budgets:\n  - {tenant: alice, daily_usd: 1, action: reject}\n",
        "b.yaml",
    )
    conn = RespConnection(server.url)
    adm = Admitter(conn)
    try:
        many = RequestFacts("alice", None, "auto", 10, 20, False, {}, completions=4)  # n: 4
        a = await adm.reserve(budget, ALICE, many, decision(budget), "n4")
        assert a.reserved_tokens == 10 + 4 * 20
        assert a.reserved_spend == 90 * 1000  # 90 tokens at $1 per million, in nano-dollars
        for i in range(10):  # 11 x 90 tokens of 1000 tpm
            await adm.reserve(budget, ALICE, many, decision(budget), f"n4-{i}")
        with pytest.raises(RateLimited, match="tokens per minute"):  # a 12th does not fit
            await adm.reserve(budget, ALICE, many, decision(budget), "n4-10")
    finally:
        await conn.close()


async def test_a_stall_longer_than_the_ttl_does_not_free_the_slots_of_requests_still_running(
    server: RedisServer,
) -> None:
    conn = RespConnection(server.url, timeout_s=0.25)
    adm = Admitter(conn, timeout_s=0.25, reservation_ttl_s=0.6)
    renewals = asyncio.create_task(adm.run_renewals())
    try:
        held = [await adm.reserve(POLICY, ALICE, FACTS, decision(), f"run-{i}") for i in range(3)]
        stall(server, 2.5)  # longer than the TTL (+1 s): the slots' lease and the key itself run out
        await asyncio.sleep(0.2)
        await awake(conn)
        await asyncio.sleep(0.5)  # a renewal round after the stall
        assert _live_slots(server) == 3  # the three requests still run, and still count
        with pytest.raises(RateLimited, match="concurrent"):
            await adm.reserve(POLICY, ALICE, FACTS, decision(), "one-too-many")
        for a in held:
            adm.settle(a, 30)
        await conn.call("PING")
        assert _live_slots(server) == 0
    finally:
        renewals.cancel()
        await conn.close()


def _live_slots(server: RedisServer) -> int:
    with redis.Redis(port=server.port) as c:
        sec, us = c.time()
        return int(c.zcount(SLOTS, sec * 1_000_000 + us, "+inf"))


async def test_a_request_no_limit_could_ever_grant_is_a_400_not_a_429(server: RedisServer) -> None:
    conn = RespConnection(server.url)
    adm = Admitter(conn)
    try:
        for max_tokens in (991, 10**30):  # 10 + 991 > 1000 tpm; and a number Lua's doubles cannot hold
            huge = RequestFacts("alice", None, "auto", 10, max_tokens, False, {})
            with pytest.raises(TooLargeForLimit) as info:
                await adm.reserve(POLICY, ALICE, huge, decision(), f"huge-{max_tokens}")
            assert info.value.status == 400 and info.value.param == "max_tokens"
        assert await conn.call("KEYS", "*") == []  # nothing was reserved anywhere
        await adm.reserve(POLICY, ALICE, FACTS, decision(), "fits")
    finally:
        await conn.close()
