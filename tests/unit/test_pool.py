"""The worker pool: least in-flight first, passive ejection with a cap, active health."""

from __future__ import annotations

from pathlib import Path

from gateway.policy import parse
from gateway.pool import EngineLoad, Worker, WorkerPool
from gateway.probes import discover, discover_registered, parse_engine_load

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
    await discover(pool, resolve)
    assert [w.url for w in pool.workers("small")] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert [w.url for w in pool.workers("big")] == ["http://127.0.0.1:9"]  # static tiers untouched
    first = next(iter(pool.workers("small")))
    pool.acquire(first)
    answers["small.llm.svc"] = ["10.0.0.1", "10.0.0.3", "fd00::7"]  # a pod left, two came
    await discover(pool, resolve)
    assert [w.url for w in pool.workers("small")] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.3:8000",
        "http://[fd00::7]:8000",
    ]
    assert pool.inflight(first) == 1  # a worker that stays keeps its state
    del answers["small.llm.svc"]  # DNS failing: keep what we had rather than empty the tier
    await discover(pool, resolve)
    assert len(list(pool.workers("small"))) == 3
    pool.sync(DNS_POLICY)  # a policy swap keeps discovered workers
    assert len(list(pool.workers("small"))) == 3


def test_engine_load_is_read_from_vllms_metrics(vllm_samples: Path) -> None:
    text = (vllm_samples / "metrics-excerpt.txt").read_text()
    assert parse_engine_load(text) == EngineLoad(running=0.0, waiting=0.0, kv_cache_usage=0.0)
    busy = (
        text.replace('vllm:num_requests_running{engine="0",model_name="tiny-small"} 0.0', "X")
        .replace("X", 'vllm:num_requests_running{engine="0",model_name="tiny-small"} 3.0\n'
                 'vllm:num_requests_running{engine="1",model_name="tiny-small"} 2.0')
        .replace('vllm:num_requests_waiting{engine="0",model_name="tiny-small"} 0.0',
                 'vllm:num_requests_waiting{engine="0",model_name="tiny-small"} 4.0')
        .replace('vllm:kv_cache_usage_perc{engine="0",model_name="tiny-small"} 0.0',
                 'vllm:kv_cache_usage_perc{engine="0",model_name="tiny-small"} 0.75')
    )  # fmt: skip
    # engines add up; waiting_by_reason (the same requests again) is not counted twice
    assert parse_engine_load(busy) == EngineLoad(running=5.0, waiting=4.0, kv_cache_usage=0.75)
    old = '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    assert parse_engine_load(old) == EngineLoad(kv_cache_usage=0.5)
    assert parse_engine_load("# HELP up x\nup 1\n") is None


def test_reported_load_steers_picks_away_from_a_worker_busy_elsewhere() -> None:
    pool = WorkerPool()
    pool.sync(POLICY)
    w1, w2, w3 = sorted(pool.workers("a"), key=lambda w: w.url)
    # w1 runs 6 requests for others (another gateway replica), w2 has a queue, w3 is idle
    pool.observe(w1, EngineLoad(running=6.0))
    pool.observe(w2, EngineLoad(running=2.0, waiting=1.0, kv_cache_usage=0.5))
    pool.observe(w3, EngineLoad())
    assert [pool.load(w) for w in (w1, w2, w3)] == [6.0, 4.5, 0.0]
    picks = []
    for _ in range(8):
        w = pool.pick("a")
        assert w is not None
        pool.acquire(w)
        picks.append(w)
    assert picks.count(w3) > picks.count(w2) > picks.count(w1)
    # requests of ours that the worker reports are not counted twice
    pool.observe(w3, EngineLoad(running=float(pool.inflight(w3))))
    assert pool.load(w3) == pool.inflight(w3)
    # no fresh report: only our own in-flight counts
    pool.observe(w1, None)
    assert pool.load(w1) == pool.inflight(w1)


async def test_a_registered_worker_leaves_when_its_lease_ends_without_another_lookup() -> None:
    policy = parse(
        """version: 1
tiers:
  a:
    model: m
    price: {input: 1, output: 1}
    workers: [{url: "http://static:1"}]
    discover: redis
routes:
  - {name: r, tier: a}
""",
        "p.yaml",
    )
    clock, wall = Clock(), Clock()
    wall.now = 1_800_000_000.0
    pool = WorkerPool(clock=clock, wall=wall)
    pool.sync(policy)
    leases = {"http://reg:2": wall.now + 2.0, "http://static:1": wall.now + 2.0}  # the static one registered too

    async def lookup(tier: str) -> dict[str, float]:
        return dict(leases)

    await discover_registered(pool, lookup)
    assert sorted(w.url for w in pool.workers("a")) == ["http://reg:2", "http://static:1"]
    assert pool.healthy_count("a") == 2
    clock.now += 1.9
    wall.now += 1.9
    assert pool.healthy_count("a") == 2
    clock.now += 0.2  # past the lease, and no lookup since: it already gets no traffic
    wall.now += 0.2
    assert pool.healthy_count("a") == 1
    assert {pool.pick("a") for _ in range(4)} == {Worker("a", "http://static:1", "m")}  # static: no lease
    leases["http://reg:2"] = wall.now + 2.0  # it beat again
    await discover_registered(pool, lookup)
    assert pool.healthy_count("a") == 2
    del leases["http://reg:2"]  # deregistered
    await discover_registered(pool, lookup)
    assert [w.url for w in pool.workers("a")] == ["http://static:1"]
