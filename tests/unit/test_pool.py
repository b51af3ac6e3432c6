"""The worker pool: least in-flight first, passive ejection with a cap, active health."""

from __future__ import annotations

from gateway.policy import parse
from gateway.pool import WorkerPool

POLICY = parse(
    """version: 1
tiers:
  a:
    model: m
    price: {input: 1, output: 1}
    workers: [{url: "http://127.0.0.1:1"}, {url: "http://127.0.0.1:2"}, {url: "http://127.0.0.1:3"}]
  b:
    model: n
    price: {input: 1, output: 1}
    workers: [{url: "http://127.0.0.1:4"}]
routes:
  - {name: r, tier: a}
""",
    "p.yaml",
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_picks_the_least_loaded_worker() -> None:
    pool = WorkerPool()
    pool.sync(POLICY)
    w1 = pool.pick("a")
    assert w1 is not None
    pool.acquire(w1)
    w2 = pool.pick("a")
    assert w2 is not None
    assert w2 != w1
    pool.acquire(w2)
    w3 = pool.pick("a")
    assert w3 is not None
    assert w3 not in (w1, w2)
    pool.acquire(w3)
    pool.acquire(w3)
    pool.release(w1)
    assert pool.pick("a") == w1


def test_ties_are_spread_in_turn() -> None:
    pool = WorkerPool()
    pool.sync(POLICY)
    picked = [w.url for w in (pool.pick("a") for _ in range(6)) if w is not None]
    assert sorted(set(picked)) == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]


def test_exclude_and_unknown_tier() -> None:
    pool = WorkerPool()
    pool.sync(POLICY)
    assert pool.pick("b", {"http://127.0.0.1:4"}) is None
    assert pool.pick("nope") is None


def test_consecutive_failures_eject_with_growing_cooldown_and_a_cap() -> None:
    clock = Clock()
    pool = WorkerPool(failures_to_eject=2, base_ejection_s=5, max_ejected_share=0.5, clock=clock)
    pool.sync(POLICY)
    w1, w2, _ = pool.workers("a")
    pool.report_failure(w1)
    assert pool.healthy_count("a") == 3
    pool.report_failure(w1)
    assert pool.healthy_count("a") == 2
    # a second ejection would take more than half of the tier out: refused
    pool.report_failure(w2)
    pool.report_failure(w2)
    assert pool.healthy_count("a") == 2
    assert all(pool.pick("a") != w1 for _ in range(5))
    pool.set_health(w1, True)  # a check passing during the cooldown does not end it
    assert pool.healthy_count("a") == 2
    clock.now += 5.1
    assert pool.healthy_count("a") == 2  # cooldown over, but no traffic until a check passes
    pool.set_health(w1, True)
    assert pool.healthy_count("a") == 3
    pool.report_failure(w1)
    pool.report_failure(w1)
    clock.now += 5.1  # the second ejection lasts 10 s
    pool.set_health(w1, True)
    assert pool.healthy_count("a") == 2
    clock.now += 5
    pool.set_health(w1, True)
    assert pool.healthy_count("a") == 3


def test_affinity_keeps_a_session_on_one_worker_until_it_leaves() -> None:
    pool = WorkerPool(failures_to_eject=1, max_ejected_share=1.0)
    pool.sync(POLICY)
    homes = {f"s{i}": pool.pick("a", session=f"s{i}") for i in range(60)}
    assert all(pool.pick("a", session=s) == w for s, w in homes.items())  # sticky, whatever the load
    assert len(set(homes.values())) == 3  # sessions spread over the tier
    gone = next(iter(pool.workers("a")))
    pool.report_failure(gone)  # that worker leaves (ejected)
    for s, w in homes.items():
        now = pool.pick("a", session=s)
        assert now != gone
        if w != gone:
            assert now == w  # only the sessions of the worker that left move


def test_a_success_resets_the_failure_count() -> None:
    pool = WorkerPool(failures_to_eject=2)
    pool.sync(POLICY)
    w = next(iter(pool.workers("b")))
    pool.report_failure(w)
    pool.report_success(w)
    pool.report_failure(w)
    assert pool.healthy_count("b") == 1


def test_active_health_gates_readiness_and_picking() -> None:
    pool = WorkerPool()
    pool.sync(POLICY)
    w = next(iter(pool.workers("b")))
    assert pool.ready_count("b") == 0  # unknown until checked
    assert pool.pick("b") == w  # but still tried
    pool.set_health(w, False)
    assert pool.pick("b") is None
    pool.set_health(w, True)
    assert pool.ready_count("b") == 1


def test_sync_keeps_state_of_workers_that_stay() -> None:
    pool = WorkerPool()
    pool.sync(POLICY)
    w = next(iter(pool.workers("b")))
    pool.acquire(w)
    pool.sync(POLICY)
    assert pool.inflight(w) == 1


DNS_POLICY = parse(
    """version: 1
tiers:
  small:
    model: m
    price: {input: 1, output: 1}
    discover: dns
    workers: [{url: "http://small.llm.svc:8000"}]
  big:
    model: n
    price: {input: 1, output: 1}
    workers: [{url: "http://127.0.0.1:9"}]
routes:
  - {name: r, tier: small}
""",
    "p.yaml",
)


async def test_dns_discovery_follows_the_addresses_of_a_name() -> None:
    answers = {"small.llm.svc": ["10.0.0.2", "10.0.0.1"]}

    async def resolve(host: str, port: int) -> list[str]:
        assert port == 8000
        if host not in answers:
            raise OSError("no such name")
        return answers[host]

    pool = WorkerPool()
    pool.sync(DNS_POLICY)
    assert list(pool.workers("small")) == []  # nothing until resolved
    await pool.discover(resolve)
    assert [w.url for w in pool.workers("small")] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert [w.url for w in pool.workers("big")] == ["http://127.0.0.1:9"]  # static tiers untouched
    first = next(iter(pool.workers("small")))
    pool.acquire(first)
    answers["small.llm.svc"] = ["10.0.0.1", "10.0.0.3", "fd00::7"]  # a pod left, two came
    await pool.discover(resolve)
    assert [w.url for w in pool.workers("small")] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.3:8000",
        "http://[fd00::7]:8000",
    ]
    assert pool.inflight(first) == 1  # a worker that stays keeps its state
    del answers["small.llm.svc"]  # DNS failing: keep what we had rather than empty the tier
    await pool.discover(resolve)
    assert len(list(pool.workers("small"))) == 3
    pool.sync(DNS_POLICY)  # a policy swap keeps discovered workers
    assert len(list(pool.workers("small"))) == 3
