"""Placement: prefix keys, rendezvous with a load cap, and the flow-control queue's order."""

from __future__ import annotations

import asyncio
import math

import msgspec
import pytest

from gateway import placement
from gateway.errors import TierSaturated
from gateway.flow import FlowControl
from gateway.policy import parse
from gateway.policy.schema import Policy, Priority, Tier
from gateway.pool import Worker, WorkerPool


def prefix_policy(urls: list[str], extra: str = "") -> Policy:
    workers = ", ".join(f'{{url: "{u}"}}' for u in urls)
    return parse(
        f"""version: 1
tiers:
  a:
    model: m
    price: {{input: 1, output: 1}}
    placement: prefix
    workers: [{workers}]
{extra}routes:
  - {{name: r, tier: a}}
""",
        "p.yaml",
    )


URLS = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]
KEYS = [placement.prefix_key([f"system prompt number {i} " * 40]) for i in range(300)]


def pool_for(policy: Policy) -> WorkerPool:
    pool = WorkerPool()
    pool.sync(policy)
    return pool


def test_prefix_key_covers_the_first_block_only() -> None:
    doc = "x" * 600
    assert placement.prefix_key(["short prompt"]) is None  # no whole block: placed by load
    assert placement.prefix_key([doc, "question one"]) == placement.prefix_key([doc, "question two"])
    assert placement.prefix_key(["y" + doc]) != placement.prefix_key([doc])
    # pieces keep their boundaries: the same characters split differently are another prompt
    assert placement.prefix_key(["ab", "c" * 600]) != placement.prefix_key(["abc", "c" * 599])


def test_every_replica_sends_a_prefix_to_the_same_worker() -> None:
    replicas = [pool_for(prefix_policy(URLS)) for _ in range(3)]
    for key in KEYS:
        picks = {r.pick("a", prefix=key) for r in replicas}
        assert len(picks) == 1
    spread = {replicas[0].pick("a", prefix=k) for k in KEYS}
    assert len(spread) == 4  # and prefixes use every worker


def test_a_worker_leaving_moves_only_its_own_prefixes() -> None:
    before = pool_for(prefix_policy(URLS))
    owner = {k: before.pick("a", prefix=k) for k in KEYS}
    after = pool_for(prefix_policy(URLS[:2] + URLS[3:]))  # 10.0.0.3 left
    moved = [k for k in KEYS if after.pick("a", prefix=k) != owner[k]]
    assert moved and all(owner[k].url == URLS[2] for k in moved)  # type: ignore[union-attr]
    assert len(moved) == sum(1 for k in KEYS if owner[k].url == URLS[2])  # type: ignore[union-attr]


def test_one_hot_prefix_spills_over_at_the_load_cap() -> None:
    pool = pool_for(prefix_policy(URLS))
    hot = KEYS[0]
    for _ in range(40):
        w = pool.pick("a", prefix=hot)
        assert w is not None
        loads = [pool.load(x) for x in pool.workers("a")]
        assert pool.load(w) + 1 <= math.ceil((1 + placement.EPSILON) * (sum(loads) + 1) / len(loads))
        pool.acquire(w)
    loads = sorted(pool.load(x) for x in pool.workers("a"))
    assert loads[-1] <= math.ceil((1 + placement.EPSILON) * 40 / 4)
    assert loads[0] > 0  # the overflow went somewhere


def test_least_load_tiers_ignore_the_prefix() -> None:
    policy = parse(
        f"""version: 1
tiers:
  a:
    model: m
    price: {{input: 1, output: 1}}
    workers: [{", ".join(f'{{url: "{u}"}}' for u in URLS)}]
routes:
  - {{name: r, tier: a}}
""",
        "p.yaml",
    )
    pool = pool_for(policy)
    picks = {pool.pick("a", prefix=KEYS[0]) for _ in range(8)}
    assert len(picks) == 4  # ties go round


def full(capacity: int = 1) -> tuple[WorkerPool, FlowControl, Tier, Worker]:
    """A gated one-worker tier whose worker is already at its capacity of one."""
    pool, flow, policy = gated(capacity)
    w = pool.pick("a")
    assert w is not None
    pool.acquire(w)
    return pool, flow, policy.tiers["a"], w


def gated(capacity: int, extra: str = "") -> tuple[WorkerPool, FlowControl, Policy]:
    policy = prefix_policy(
        URLS[:1], f"    max_inflight: {capacity}\n    queue_timeout_ms: 2000\n    max_queue: 30\n{extra}"
    )
    pool = pool_for(policy)
    return pool, FlowControl(pool), policy


async def test_a_flooding_tenant_does_not_starve_a_trickle() -> None:
    pool, flow, policy = gated(1)
    tier = policy.tiers["a"]
    order: list[str] = []
    w = pool.pick("a")
    assert w is not None
    pool.acquire(w)  # the worker is full

    async def request(tenant: str, priority: Priority = Priority.INTERACTIVE) -> None:
        granted, _ = await flow.enter(tier, tenant, 1, priority, None)
        assert granted
        worker = pool.pick("a")
        assert worker is not None
        pool.acquire(worker)
        order.append(tenant)
        await asyncio.sleep(0)
        pool.release(worker)

    flood = [asyncio.create_task(request("flood")) for _ in range(10)]
    await asyncio.sleep(0)
    trickle = asyncio.create_task(request("trickle"))
    batch = asyncio.create_task(request("nightly", Priority.BATCH))
    await asyncio.sleep(0)
    assert flow.queued("a") == 12
    pool.release(w)
    await asyncio.gather(*flood, trickle, batch)
    assert order.index("trickle") <= 1  # one turn at most behind the flood
    assert order[-1] == "nightly"  # batch waits for every interactive request
    assert order.count("flood") == 10  # and the flood got every other slot


async def test_a_queue_deadline_is_a_503_with_retry_after_and_leaves_the_queue() -> None:
    _, flow, tier, _ = full()
    with pytest.raises(TierSaturated) as info:
        await flow.enter(msgspec.structs.replace(tier, queue_timeout_s=0.05), "t", 1, Priority.INTERACTIVE, None)
    assert info.value.status == 503 and info.value.headers["retry-after"].isdigit()
    assert flow.queued("a") == 0


async def test_a_waiter_that_leaves_frees_its_place_and_its_slot() -> None:
    pool, flow, tier, w = full()
    leaving = asyncio.create_task(flow.enter(tier, "a", 1, Priority.INTERACTIVE, None))
    staying = asyncio.create_task(flow.enter(tier, "b", 1, Priority.INTERACTIVE, None))
    await asyncio.sleep(0)
    pool.release(w)  # the slot goes to the first waiter, who leaves before taking it
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert (await staying)[0]  # the slot was passed on
    assert flow.queued("a") == 0
    assert not flow.must_wait("a")


async def test_spill_happens_only_past_the_bound() -> None:
    pool, flow, tier, w = full()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, pool.release, w)
    granted, waited = await flow.enter(tier, "t", 1, Priority.INTERACTIVE, 0.5)  # freed well within the bound
    assert granted and waited < 0.5
    pool.acquire(w)
    granted, waited = await flow.enter(tier, "t", 1, Priority.INTERACTIVE, 0.1)  # never freed: spills at 0.1 s
    assert not granted and 0.1 <= waited < 0.5


def test_a_keys_priority_overrides_its_routes() -> None:
    from gateway.auth import Principal
    from gateway.dispatch import caller_of as caller
    from gateway.policy import RoutingDecision

    policy = parse(
        """version: 1
tiers:
  a: {model: m, price: {input: 1, output: 1}, workers: [{url: "http://a:1"}]}
routes:
  - {name: r, tier: a, priority: batch}
fairness:
  key_priority: {k-live: interactive, k-batch: batch}
""",
        "p.yaml",
    )
    batch_route = RoutingDecision(policy.revision, "r", "a", (), priority=Priority.BATCH)
    plain_route = RoutingDecision(policy.revision, "r", "a", ())
    assert caller(policy, Principal("k-live", "t"), batch_route).priority is Priority.INTERACTIVE
    assert caller(policy, Principal("k-other", "t"), batch_route).priority is Priority.BATCH
    assert caller(policy, Principal("k-batch", "t"), plain_route).priority is Priority.BATCH
    assert caller(policy, Principal("k-other", "t"), plain_route).priority is Priority.INTERACTIVE
    assert policy.routes[0].priority is Priority.BATCH


async def test_a_policy_that_drops_the_capacity_lets_the_queue_go() -> None:
    pool, flow, tier, _ = full()
    waiting = asyncio.create_task(flow.enter(tier, "t", 1, Priority.INTERACTIVE, None))
    await asyncio.sleep(0)
    assert flow.queued("a") == 1
    pool.sync(prefix_policy(URLS[:1]))  # no max_inflight any more
    assert (await waiting)[0]
    assert pool.room("a") > 1000
