"""The hot path on a real Redis Cluster (3 primaries + 3 replicas): routing by hash slot, MOVED,
the tier-wide limit whose keys live in another slot than the tenant's, and late replies released on
the node that holds the reservation."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from gateway import crossslot, ledger_report
from gateway.admission import Admitter, plan
from gateway.auth import Principal
from gateway.cluster import ClusterConnection, _decode, first_key, redirect
from gateway.errors import RateLimited, StateUnavailable
from gateway.facts import RequestFacts
from gateway.ledger import Ledger
from gateway.policy import RoutingDecision, parse
from gateway.resp import RedisError, RespConnection, encode
from gateway.store import connect
from tests.factories import ledger_record
from tests.procs import ClusterServer
from tests.unit.test_reservations import until

pytestmark = pytest.mark.slow

LIMITS = """version: 1
tiers:
  t: {model: m, price: {input: 1, output: 1}}
routes:
  - {name: r, tier: t}
limits:
  - {scope: tenant, rpm: 3, concurrency: 2}
  - {scope: tier, rpm: 4, concurrency: 3}
"""
POLICY = parse(LIMITS, "p.yaml")


def decision() -> RoutingDecision:
    return RoutingDecision(POLICY.revision, "r", "t", ())


def facts(tenant: str) -> RequestFacts:
    return RequestFacts(tenant, None, "auto", 10, 20, False, {})


def owner(cluster: ClusterServer, key: str) -> int:
    """The port of the primary serving ``key``."""
    slot = int(cluster.command(cluster.primaries()[0], "CLUSTER", "KEYSLOT", key))
    for start, end, primary, *_ in cluster.command(cluster.primaries()[0], "CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return int(primary[1])
    raise AssertionError(f"no owner for {key}")


def live_slots(cluster: ClusterServer, key: str) -> int:
    port = owner(cluster, key)
    sec, us = cluster.command(port, "TIME")
    return int(cluster.command(port, "ZCOUNT", key, int(sec) * 1_000_000 + int(us), "+inf"))


async def test_commands_go_to_the_primary_of_their_slot_and_moved_is_followed(redis_cluster: ClusterServer) -> None:
    conn = ClusterConnection(redis_cluster.url)
    try:
        keys = [f"k{i}" for i in range(60)]
        assert await conn.pipeline([("SET", k, k) for k in keys]) == [b"OK"] * 60
        for k in keys[:10]:  # each landed on its own primary: a plain GET there finds it
            assert redis_cluster.command(owner(redis_cluster, k), "GET", k) == k.encode()
        assert len({owner(redis_cluster, k) for k in keys}) == 3
        # a wrong map (every slot on one primary): single calls follow MOVED, and the map learns
        wrong = conn.primaries[0]
        conn.slots = [wrong] * len(conn.slots)
        assert [await conn.call("GET", k) for k in keys] == [k.encode() for k in keys]
        await until(lambda: len(set(conn.slots)) == 3)
        # a pipeline given a wrong map returns MOVED for what went astray (its owners retry), then
        # goes right
        conn.slots = [wrong] * len(conn.slots)
        replies = await conn.pipeline([("GET", k) for k in keys])
        assert any(isinstance(r, Exception) and str(r).startswith("MOVED") for r in replies)
        await until(lambda: len(set(conn.slots)) == 3)
        assert await conn.pipeline([("GET", k) for k in keys]) == [k.encode() for k in keys]
        assert await conn.call("SCRIPT", "LOAD", "return 1") == await conn.call("SCRIPT", "LOAD", "return 1")
        for port in redis_cluster.primaries():  # loaded on every primary
            assert redis_cluster.command(port, "SCRIPT", "EXISTS", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db") == [1]
    finally:
        await conn.close()


def test_routing_keys_and_redirects_are_read_from_commands() -> None:
    assert first_key(("EVALSHA", "abc", 2, "gw:{t:a}:x", "gw:{t:a}:y", 1)) == b"gw:{t:a}:x"
    assert first_key(("EVALSHA", "abc", 0, 1)) is None
    assert first_key(("ZREM", "gw:{t:a}:c", "rid")) == b"gw:{t:a}:c"
    assert first_key(("WAIT", 1, 100)) is None and first_key(("SCRIPT", "LOAD", "x")) is None
    payload = encode(("EVALSHA", "abc", 1, "gw:{tier:t}:rl:1:c", "rid"))
    assert first_key(_decode(payload)) == b"gw:{tier:t}:rl:1:c"  # a pre-encoded admission, read back
    assert redirect(RedisError("MOVED 3999 127.0.0.1:6381")) == ("MOVED", 3999, ("127.0.0.1", 6381))
    assert redirect(RedisError("ASK 1 redis-cluster-2.redis-cluster:6379")) == (
        "ASK",
        1,
        ("redis-cluster-2.redis-cluster", 6379),
    )
    assert redirect(RedisError("NOSCRIPT No matching script")) is None and redirect(TimeoutError()) is None


def test_parts_and_merge() -> None:
    planned = plan(POLICY, Principal("k", "alice"), "t", 30, 5_000_000)
    assert [crossslot.tag(i.key) for i in planned] == ["gw:{t:alice}"] * 2 + ["gw:{tier:t}"] * 2
    assert crossslot.parts(planned) == [[0, 1], [2, 3]]
    ok = [1, 0, 0, 100, 2, 10, 1, 20]
    refused = [0, 2, 5, 90, 3, 0, 0, 30]
    assert crossslot.merge([ok, ok], [[0, 1], [2, 3]], 4) == [1, 0, 0, 100, 2, 10, 1, 20, 2, 10, 1, 20]
    assert crossslot.merge([ok, refused], [[0, 1], [2, 3]], 4) == [0, 4, 5, 90, 2, 10, 1, 20, 3, 0, 0, 30]
    assert crossslot.merge([TimeoutError(), refused], [[0, 1], [2, 3]], 4)[:4] == [0, 4, 5, 90]


async def test_a_tier_wide_limit_holds_across_tenants_and_a_refusal_releases_the_other_slot(
    redis_cluster: ClusterServer,
) -> None:
    conn = ClusterConnection(redis_cluster.url)
    adm = Admitter(conn)
    settler = asyncio.create_task(adm.run_settler())
    try:
        tenant_key, tier_key = "gw:{t:alice}:rl:0:tenant:c", "gw:{tier:t}:rl:1:c"
        assert key_slot(tenant_key.encode()) != key_slot(tier_key.encode())  # one script would be CROSSSLOT
        alice, bob = Principal("ka", "alice"), Principal("kb", "bob")
        a = [await adm.reserve(POLICY, alice, facts("alice"), decision(), f"a{i}") for i in range(2)]
        # alice's own concurrency (2) refuses her third: the tier's slot it took is released at once
        with pytest.raises(RateLimited, match="2 concurrent"):
            await adm.reserve(POLICY, alice, facts("alice"), decision(), "a2")
        await until(lambda: live_slots(redis_cluster, tier_key) == 2)
        b = await adm.reserve(POLICY, bob, facts("bob"), decision(), "b0")  # the tier's third slot
        with pytest.raises(RateLimited, match="3 concurrent"):  # the tier is full, whoever asks
            await adm.reserve(POLICY, bob, facts("bob"), decision(), "b1")
        await until(lambda: live_slots(redis_cluster, "gw:{t:bob}:rl:0:tenant:c") == 1)  # the refused one: given back
        for x in (*a, b):
            adm.settle(x, 30)
        await until(lambda: live_slots(redis_cluster, tier_key) == 0)
        # requests per minute: the tier's 4 hold across tenants; refused and released ones cost nothing
        got = []
        for i in range(8):
            who = alice if i % 2 else bob
            try:
                adm.settle(await adm.reserve(POLICY, who, facts(who.tenant), decision(), f"r{i}"), 30)
                got.append(who.tenant)
            except RateLimited:
                pass
        assert len(got) == 1  # 3 admitted above (a0, a1, b0) + 1 = the tier's 4 per minute
    finally:
        settler.cancel()
        await conn.close()


async def test_a_late_reply_is_released_on_the_node_that_made_it(redis_cluster: ClusterServer) -> None:
    conn = ClusterConnection(redis_cluster.url, timeout_s=0.25)
    adm = Admitter(conn, timeout_s=0.25)
    settler = asyncio.create_task(adm.run_settler())
    alice = Principal("ka", "alice")
    tenant_key = "gw:{t:alice}:rl:0:tenant:c"
    policy = parse(LIMITS.replace("  - {scope: tier, rpm: 4, concurrency: 3}\n", ""), "p.yaml")
    try:
        await conn.call("SCRIPT", "LOAD", adm._admit.source)
        port = owner(redis_cluster, tenant_key)
        staller = redis.Redis(port=port)
        threading.Thread(target=lambda: (staller.execute_command("DEBUG", "SLEEP", 1.0), staller.close())).start()
        await asyncio.sleep(0.1)
        with pytest.raises(StateUnavailable):  # fail_closed: refused, although the node will run it
            await adm.reserve(policy, alice, facts("alice"), decision(), "late")
        await until(lambda: adm.released == 1)
        await until(lambda: live_slots(redis_cluster, tenant_key) == 0)
        held = [await adm.reserve(policy, alice, facts("alice"), decision(), f"ok{i}") for i in range(2)]
        assert all(h.items for h in held)  # the whole limit is usable again
    finally:
        settler.cancel()
        await conn.close()


async def test_one_redis_keeps_one_script_call(redis_url: str) -> None:
    """On one Redis a tier-wide limit stays in the request's single atomic call."""
    conn = RespConnection(redis_url)
    adm = Admitter(conn)
    try:
        await adm.reserve(POLICY, Principal("ka", "alice"), facts("alice"), decision(), "warm-up")  # loads it
        with redis.Redis.from_url(redis_url) as c:
            c.config_resetstat()
            a = await adm.reserve(POLICY, Principal("ka", "alice"), facts("alice"), decision(), "x")
            assert {crossslot.tag(i.key) for i in a.items} == {"gw:{t:alice}", "gw:{tier:t}"}
            assert c.info("commandstats")["cmdstat_evalsha"]["calls"] == 1
    finally:
        await conn.close()


async def test_a_ledger_batch_counts_once_a_replica_has_it(redis_cluster: ClusterServer, tmp_path: Path) -> None:
    conn = ClusterConnection(redis_cluster.url, timeout_s=1.0)
    client = connect(redis_cluster.url, timeout_s=5, mode="cluster")
    try:
        records = [ledger_record(f"w-{i}", time=1_700_000_000 + i) for i in range(20)]
        assert await Ledger(conn, str(tmp_path), wait_replicas=1, wait_ms=2000).write(records) == 20  # 1 each
        # more replicas than there are: written on the primary, but not counted as safe — so it spools,
        # and the replay is idempotent
        cautious = Ledger(conn, str(tmp_path), wait_replicas=2, wait_ms=50)
        more = [ledger_record(f"w-{i}", time=1_700_000_000 + i) for i in range(20, 25)]
        cautious.record(more[0])
        assert await cautious.flush() == 0 and cautious.spool.exists()
        assert await Ledger(conn, str(tmp_path)).write(more) == 4  # the spooled one is there already
        assert [r.request_id async for r in ledger_report.records(client)] == [f"w-{i}" for i in range(25)]
        assert await ledger_report.verify(client) == []
    finally:
        await conn.close()
        await client.aclose()
