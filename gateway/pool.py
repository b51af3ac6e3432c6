"""The pool stage: which worker of a tier serves the next attempt.

Workers are picked by load, ties broken in turn. A worker's load is the requests this gateway has
in flight on it, refined by what the worker itself reports on ``/metrics`` (scraped in the
background about once a second, never on the request path): the requests it is running or queueing
for anyone else (other gateway replicas, direct clients), its waiting queue once more (a queue
means it is saturated), and its KV-cache usage (0 to 1, which breaks ties toward the emptier cache).
Health is learnt passively from dispatch outcomes (consecutive failures eject a worker for a
growing cooldown, never more than a set share of a tier at once, as Envoy's outlier detection does)
and actively by a background ``/health`` loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import httpx
import msgspec
import structlog
from prometheus_client.parser import text_string_to_metric_families

from gateway.policy.schema import Policy

log = structlog.get_logger("gateway.pool")


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _weight(session: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{session}\0{url}".encode(), digest_size=8).digest(), "big")


class Worker(msgspec.Struct, frozen=True):
    tier: str
    url: str
    model: str


class EngineLoad(msgspec.Struct, frozen=True):
    """What a vLLM worker reports of its own load (summed over its engines)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0 to 1 (the highest of its engines)


_LOAD_METRICS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv",
    "vllm:gpu_cache_usage_perc": "kv",  # the name before vLLM 0.10
}


def parse_engine_load(text: str) -> EngineLoad | None:
    """The load gauges out of vLLM's ``/metrics`` text; None if it has none of them. Only the few
    lines that matter are handed to prometheus-client's parser (the page is ~50 KB)."""
    wanted = "\n".join(
        line for line in text.splitlines() if line.startswith(("vllm:num_requests_", "vllm:kv_", "vllm:gpu_cache"))
    )
    found = {"running": 0.0, "waiting": 0.0, "kv": 0.0}
    seen = False
    for family in text_string_to_metric_families(wanted + "\n"):
        field = _LOAD_METRICS.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.name != family.name:
                continue
            seen = True
            found[field] = max(found[field], sample.value) if field == "kv" else found[field] + sample.value
    return EngineLoad(found["running"], found["waiting"], found["kv"]) if seen else None


class _State:
    __slots__ = (
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "inflight",
        "lease_until",
        "outside",
        "probation",
        "worker",
    )

    def __init__(self, worker: Worker):
        self.worker = worker
        self.inflight = 0
        self.outside = 0.0  # load the worker reports beyond ours: see ``WorkerPool.observe``
        self.lease_until = math.inf  # a registered worker: when its heartbeat lapses (pool clock)
        self.failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.probation = False  # ejected: no traffic until a check passes after the cooldown
        self.healthy: bool | None = None  # unknown until the first active check


class WorkerPool:
    def __init__(
        self,
        *,
        failures_to_eject: int = 3,
        base_ejection_s: float = 5.0,
        max_ejection_s: float = 60.0,
        max_ejected_share: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self._tiers: dict[str, list[_State]] = {}
        self._by_url: dict[tuple[str, str], _State] = {}
        self._policy: Policy | None = None
        self._discovered: dict[str, list[str]] = {}  # tier -> worker URLs found through DNS
        self._turn: dict[str, int] = {}
        self.failures_to_eject = failures_to_eject
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self.max_ejected_share = max_ejected_share
        self._clock = clock
        self._wall = wall
        self._leases: dict[tuple[str, str], float] = {}  # registered workers: lease end, pool clock

    def sync(self, policy: Policy) -> None:
        """Make the pool hold exactly the policy's workers (and those DNS discovery found for tiers
        that use it), keeping the state of those that stay."""
        self._policy = policy
        tiers: dict[str, list[_State]] = {}
        by_url: dict[tuple[str, str], _State] = {}
        for tier in policy.tiers.values():
            states = []
            if tier.discover_dns:
                urls = self._discovered.get(tier.name, [])
            else:
                found = [u for u in self._discovered.get(tier.name, []) if u not in tier.workers]
                urls = [*tier.workers, *found] if tier.discover_redis else list(tier.workers)
            for url in urls:
                worker = Worker(tier.name, url, tier.model)
                old = self._by_url.get((tier.name, url))
                state = old if old is not None and old.worker == worker else _State(worker)
                state.lease_until = (
                    self._leases.get((tier.name, url), math.inf) if url not in tier.workers else math.inf
                )
                states.append(state)
                by_url[(tier.name, url)] = state
            tiers[tier.name] = states
        self._tiers, self._by_url = tiers, by_url

    async def discover(self, resolve: Resolver) -> None:
        """Resolve the worker names of tiers with ``discover: dns``; every address becomes a worker
        (a headless Kubernetes Service lists its pods this way). Addresses that disappear leave."""
        policy = self._policy
        if policy is None:
            return
        changed = False
        for tier in policy.tiers.values():
            if not tier.discover_dns:
                continue
            found: list[str] = []
            for url in tier.workers:
                parts = urlsplit(url)
                host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
                try:
                    addresses = await resolve(host, port)
                except OSError as exc:
                    log.warning("worker_discovery_failed", tier=tier.name, name=host, error=repr(exc))
                    addresses = [a for u in self._discovered.get(tier.name, []) if (a := urlsplit(u).hostname)]
                for address in sorted(set(addresses)):
                    netloc = f"[{address}]" if ":" in address else address
                    found.append(f"{parts.scheme}://{netloc}:{port}{parts.path.rstrip('/')}")
            if found != self._discovered.get(tier.name):
                log.info("workers_discovered", tier=tier.name, workers=found)
                self._discovered[tier.name] = found
                changed = True
        if changed:
            self.sync(policy)

    async def discover_registered(self, lookup: Callable[[str], Awaitable[Mapping[str, float]]]) -> None:
        """Workers registered in Redis for tiers with ``discover: redis`` (URL -> when the lease
        of its last heartbeat ends, unix seconds). A registered worker gets no traffic once its
        lease ends, even before the next lookup: lapsed workers leave within their TTL."""
        policy = self._policy
        if policy is None:
            return
        changed = False
        for tier in policy.tiers.values():
            if not tier.discover_redis:
                continue
            try:
                found = await lookup(tier.name)
            except (OSError, TimeoutError, RuntimeError) as exc:
                log.warning("worker_registry_unreachable", tier=tier.name, error=repr(exc))
                continue
            offset = self._clock() - self._wall()
            for url, until in found.items():
                self._leases[(tier.name, url)] = until + offset
                s = self._by_url.get((tier.name, url))
                if s is not None and url not in tier.workers:
                    s.lease_until = until + offset
            urls = sorted(found)
            if urls != self._discovered.get(tier.name):
                log.info("workers_registered", tier=tier.name, workers=urls)
                self._discovered[tier.name] = urls
                for key in [k for k in self._leases if k[0] == tier.name and k[1] not in found]:
                    del self._leases[key]
                changed = True
        if changed:
            self.sync(policy)

    async def run_registry(self, lookup: Callable[[str], Awaitable[Mapping[str, float]]], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.discover_registered(lookup)

    def workers(self, tier: str | None = None) -> Iterable[Worker]:
        for name, states in self._tiers.items():
            if tier is None or name == tier:
                yield from (s.worker for s in states)

    def _available(self, s: _State, now: float) -> bool:
        return s.healthy is not False and not s.probation and s.ejected_until <= now < s.lease_until

    def pick(
        self, tier: str, exclude: frozenset[str] | set[str] = frozenset(), session: str | None = None
    ) -> Worker | None:
        """The least-loaded available worker of ``tier``; with a ``session`` key, the worker that
        rendezvous hashing gives it (stable while that worker stays, so vLLM's prefix cache hits)."""
        states = self._tiers.get(tier)
        if not states:
            return None
        now = self._clock()
        if session is not None:
            candidates = [s for s in states if s.worker.url not in exclude and self._available(s, now)]
            if not candidates:
                return None
            return max(candidates, key=lambda s: _weight(session, s.worker.url)).worker
        n = len(states)
        start = self._turn.get(tier, 0)
        self._turn[tier] = (start + 1) % n
        best: _State | None = None
        for i in range(n):
            s = states[(start + i) % n]
            if s.worker.url in exclude or not self._available(s, now):
                continue
            if best is None or s.inflight + s.outside < best.inflight + best.outside:
                best = s
        return best.worker if best is not None else None

    def healthy_count(self, tier: str) -> int:
        now = self._clock()
        return sum(1 for s in self._tiers.get(tier, ()) if self._available(s, now))

    def ready_count(self, tier: str) -> int:
        """Workers of ``tier`` that passed their last active check and are not ejected."""
        now = self._clock()
        return sum(1 for s in self._tiers.get(tier, ()) if s.healthy is True and self._available(s, now))

    def acquire(self, worker: Worker) -> None:
        s = self._by_url.get((worker.tier, worker.url))
        if s is not None:
            s.inflight += 1

    def release(self, worker: Worker) -> None:
        s = self._by_url.get((worker.tier, worker.url))
        if s is not None and s.inflight > 0:
            s.inflight -= 1

    def inflight(self, worker: Worker) -> int:
        s = self._by_url.get((worker.tier, worker.url))
        return s.inflight if s is not None else 0

    def observe(self, worker: Worker, load: EngineLoad | None) -> None:
        """Take a worker's own report of its load (None: no fresh report, so only ours counts).

        ``outside`` = requests it runs or queues beyond those we have in flight on it now, plus its
        queue once more, plus its KV-cache usage; ``pick`` compares ``inflight + outside``."""
        s = self._by_url.get((worker.tier, worker.url))
        if s is None:
            return
        if load is None:
            s.outside = 0.0
            return
        others = max(0.0, load.running + load.waiting - s.inflight)
        s.outside = others + load.waiting + min(max(load.kv_cache_usage, 0.0), 1.0)

    def load(self, worker: Worker) -> float:
        """The load ``pick`` compares for this worker."""
        s = self._by_url.get((worker.tier, worker.url))
        return s.inflight + s.outside if s is not None else 0.0

    async def scrape_once(self, client: httpx.AsyncClient, wait_s: float = 1.0) -> None:
        """Read every worker's ``/metrics``; a worker that does not answer reports nothing."""

        async def scrape(w: Worker) -> None:
            load: EngineLoad | None = None
            try:
                async with asyncio.timeout(wait_s):
                    r = await client.get(f"{w.url}/metrics", timeout=wait_s)
                if r.status_code == 200:
                    load = parse_engine_load(r.text)
            except (httpx.HTTPError, OSError, TimeoutError, ValueError):
                load = None
            self.observe(w, load)

        await asyncio.gather(*(scrape(w) for w in list(self.workers())))

    async def run_load_scrapes(self, client: httpx.AsyncClient, interval: float) -> None:
        while True:
            await self.scrape_once(client, wait_s=max(interval, 0.5))
            await asyncio.sleep(interval)

    def report_success(self, worker: Worker) -> None:
        s = self._by_url.get((worker.tier, worker.url))
        if s is not None:
            s.failures = 0

    def report_failure(self, worker: Worker) -> None:
        s = self._by_url.get((worker.tier, worker.url))
        if s is None:
            return
        s.failures += 1
        if s.failures < self.failures_to_eject:
            return
        states = self._tiers[worker.tier]
        now = self._clock()
        ejected = sum(1 for o in states if o.ejected_until > now or o.probation)
        if len(states) > 1 and (ejected + 1) / len(states) > self.max_ejected_share:
            return
        s.ejections += 1
        cooldown = min(self.base_ejection_s * 2 ** (s.ejections - 1), self.max_ejection_s)
        s.ejected_until = now + cooldown
        s.probation = True
        s.failures = 0
        log.warning("worker_ejected", tier=worker.tier, worker=worker.url, cooldown_s=cooldown)

    def set_health(self, worker: Worker, healthy: bool) -> None:
        s = self._by_url.get((worker.tier, worker.url))
        if s is None:
            return
        if healthy and not s.healthy:
            log.info("worker_healthy", tier=worker.tier, worker=worker.url)
        elif not healthy and s.healthy is not False:
            log.warning("worker_unhealthy", tier=worker.tier, worker=worker.url)
        s.healthy = healthy
        if healthy and s.probation and s.ejected_until <= self._clock():
            s.probation = False  # the cooldown is over and a check passed: traffic again
            log.info("worker_readmitted", tier=worker.tier, worker=worker.url)

    async def check_once(self, client: httpx.AsyncClient, probe_timeout: float = 2.0) -> None:
        async def probe(w: Worker) -> None:
            try:
                async with asyncio.timeout(probe_timeout):
                    r = await client.get(f"{w.url}/health", timeout=probe_timeout)
                ok = r.status_code == 200
            except (httpx.HTTPError, OSError, TimeoutError):
                ok = False
            self.set_health(w, ok)

        await asyncio.gather(*(probe(w) for w in list(self.workers())))

    def states(self) -> list[tuple[str, str, bool, int]]:
        """(tier, url, available, in flight) of every worker, for metrics."""
        now = self._clock()
        return [
            (s.worker.tier, s.worker.url, s.healthy is True and s.ejected_until <= now < s.lease_until, s.inflight)
            for states in self._tiers.values()
            for s in states
        ]

    async def run_health_checks(
        self,
        client: httpx.AsyncClient,
        interval: float,
        report: Callable[[list[tuple[str, str, bool, int]]], None],
        resolve: Resolver | None = None,
    ) -> None:
        while True:
            await self.discover(resolve or system_resolver)
            await self.check_once(client)
            report(self.states())
            await asyncio.sleep(interval)
