"""The pool stage: the workers of each tier, their state, and which one serves the next attempt.

A worker's load is the requests this gateway has in flight on it, refined by what the worker itself
reports on ``/metrics`` (read in the background by ``probes``, never on the request path): the
requests it is running or queueing for anyone else (other gateway replicas, direct clients), its
waiting queue once more (a queue means it is saturated), and its KV-cache usage (0 to 1, which
breaks ties toward the emptier cache). ``placement`` chooses among the available workers by that
load, or by the prompt's prefix. A tier with ``max_inflight`` has capacities: a worker at its
capacity (ours plus what it runs for others) takes nothing more, and ``flow`` queues the request.

Health is learnt passively from dispatch outcomes (consecutive failures eject a worker for a
growing cooldown, never more than a set share of a tier at once, as Envoy's outlier detection does)
and actively by ``probes``' ``/health`` loop; discovery (DNS, the registry) is ``probes``' too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

import msgspec
import structlog

from gateway import placement
from gateway.policy.schema import Placement, Policy

log = structlog.get_logger("gateway.pool")


class Worker(msgspec.Struct, frozen=True):
    tier: str
    url: str
    model: str


class EngineLoad(msgspec.Struct, frozen=True):
    """What a vLLM worker reports of its own load (summed over its engines)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0 to 1 (the highest of its engines)


_UNBOUNDED = 1 << 62  # the room of workers without a capacity


class _State:
    __slots__ = (
        "capacity",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "inflight",
        "lease_until",
        "others",
        "outside",
        "probation",
        "url",
        "worker",
    )

    def __init__(self, worker: Worker):
        self.worker = worker
        self.url = worker.url
        self.inflight = 0
        self.outside = 0.0  # load the worker reports beyond ours: see ``WorkerPool.observe``
        self.others = 0.0  # requests it runs or queues for others: counts against its capacity
        self.capacity = math.inf  # the tier's (or this worker's) max_inflight
        self.lease_until = math.inf  # a registered worker: when its heartbeat lapses (pool clock)
        self.failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.probation = False  # ejected: no traffic until a check passes after the cooldown
        self.healthy: bool | None = None  # unknown until the first active check

    @property
    def load(self) -> float:
        return self.inflight + self.outside

    @property
    def room(self) -> float:
        return self.capacity - self.inflight - self.others


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
        self.policy: Policy | None = None
        self.discovered: dict[str, list[str]] = {}  # tier -> worker URLs found through DNS or the registry
        self.leases: dict[tuple[str, str], float] = {}  # registered workers: lease end, pool clock
        self._turn: dict[str, int] = {}
        self.failures_to_eject = failures_to_eject
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self.max_ejected_share = max_ejected_share
        self.clock = clock
        self.wall = wall
        # called with a tier's name when capacity may have come free there (``flow`` releases its
        # queue), and whether a request just ended there (not a scrape or a check)
        self.on_free: Callable[[str, bool], None] | None = None

    def sync(self, policy: Policy) -> None:
        """Make the pool hold exactly the policy's workers (and those discovery found for tiers
        that use it), keeping the state of those that stay."""
        self.policy = policy
        tiers: dict[str, list[_State]] = {}
        by_url: dict[tuple[str, str], _State] = {}
        for tier in policy.tiers.values():
            states = []
            if tier.discover_dns:
                urls = self.discovered.get(tier.name, [])
            else:
                found = [u for u in self.discovered.get(tier.name, []) if u not in tier.workers]
                urls = [*tier.workers, *found] if tier.discover_redis else list(tier.workers)
            for url in urls:
                worker = Worker(tier.name, url, tier.model)
                old = self._by_url.get((tier.name, url))
                state = old if old is not None and old.worker == worker else _State(worker)
                state.lease_until = self.leases.get((tier.name, url), math.inf) if url not in tier.workers else math.inf
                capacity = tier.capacity(url)
                state.capacity = math.inf if capacity is None else capacity
                states.append(state)
                by_url[(tier.name, url)] = state
            tiers[tier.name] = states
        self._tiers, self._by_url = tiers, by_url
        self.capacity_changed()

    def set_lease(self, tier: str, url: str, until: float) -> None:
        """A registered worker's lease end (pool clock), effective at once for a worker in the pool."""
        self.leases[(tier, url)] = until
        s = self._by_url.get((tier, url))
        if s is not None and self.policy is not None and url not in self.policy.tiers[tier].workers:
            s.lease_until = until

    def workers(self, tier: str | None = None) -> Iterable[Worker]:
        for name, states in self._tiers.items():
            if tier is None or name == tier:
                yield from (s.worker for s in states)

    def _available(self, s: _State, now: float) -> bool:
        return s.healthy is not False and not s.probation and s.ejected_until <= now < s.lease_until

    def pick(
        self,
        tier: str,
        exclude: frozenset[str] | set[str] = frozenset(),
        session: str | None = None,
        prefix: bytes | None = None,
    ) -> Worker | None:
        """An available worker of ``tier`` with room: with a ``session`` key, the worker rendezvous
        hashing gives it (stable while that worker stays); on a ``prefix`` tier with a prefix key,
        the prefix's worker within the load cap; else the least loaded. None: no worker has room."""
        states = self._tiers.get(tier)
        if not states:
            return None
        now = self.clock()
        n = len(states)
        start = self._turn.get(tier, 0)
        self._turn[tier] = (start + 1) % n
        keyed = session is not None or (
            prefix is not None and self.policy is not None and self.policy.tiers[tier].placement is Placement.PREFIX
        )
        best: _State | None = None
        best_load = math.inf
        candidates = []
        for i in range(n):  # in turn from ``start``, so that ties go round
            s = states[(start + i) % n]
            if s.url in exclude or not self._available(s, now) or s.inflight + s.others >= s.capacity:
                continue
            if keyed:
                candidates.append(s)
            elif (load := s.inflight + s.outside) < best_load:  # least load: the common case, inline
                best, best_load = s, load
        if not keyed:
            return best.worker if best is not None else None
        if not candidates:
            return None
        if session is not None:
            return placement.by_session(session, candidates).worker
        assert prefix is not None
        return placement.by_prefix(prefix, candidates).worker

    def room(self, tier: str) -> int:
        """Requests the available workers of ``tier`` can take before all are at capacity."""
        now = self.clock()
        total = 0.0
        for s in self._tiers.get(tier, ()):
            if self._available(s, now):
                total += max(0.0, s.room)  # inf for a worker without a capacity
        return math.floor(total) if total != math.inf else _UNBOUNDED

    def healthy_count(self, tier: str) -> int:
        now = self.clock()
        return sum(1 for s in self._tiers.get(tier, ()) if self._available(s, now))

    def ready_count(self, tier: str) -> int:
        """Workers of ``tier`` that passed their last active check and are not ejected."""
        now = self.clock()
        return sum(1 for s in self._tiers.get(tier, ()) if s.healthy is True and self._available(s, now))

    def acquire(self, worker: Worker) -> None:
        s = self._by_url.get((worker.tier, worker.url))
        if s is not None:
            s.inflight += 1

    def release(self, worker: Worker) -> None:
        s = self._by_url.get((worker.tier, worker.url))
        if s is not None and s.inflight > 0:
            s.inflight -= 1
            if s.capacity != math.inf and self.on_free is not None:
                self.on_free(worker.tier, True)

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
            s.outside = s.others = 0.0
            return
        s.others = max(0.0, load.running + load.waiting - s.inflight)
        s.outside = s.others + load.waiting + min(max(load.kv_cache_usage, 0.0), 1.0)

    def load(self, worker: Worker) -> float:
        """The load ``pick`` compares for this worker."""
        s = self._by_url.get((worker.tier, worker.url))
        return s.load if s is not None else 0.0

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
        now = self.clock()
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
        if healthy and s.probation and s.ejected_until <= self.clock():
            s.probation = False  # the cooldown is over and a check passed: traffic again
            log.info("worker_readmitted", tier=worker.tier, worker=worker.url)

    def capacity_changed(self) -> None:
        """Capacity may have changed anywhere (a scrape, a check, a policy or discovery change)."""
        if self.on_free is not None:
            for tier in self._tiers:
                self.on_free(tier, False)

    def states(self) -> list[tuple[str, str, bool, int]]:
        """(tier, url, available, in flight) of every worker, for metrics."""
        now = self.clock()
        return [
            (s.worker.tier, s.worker.url, s.healthy is True and s.ejected_until <= now < s.lease_until, s.inflight)
            for states in self._tiers.values()
            for s in states
        ]

    def leased(self, tier: str, found: Mapping[str, float]) -> None:
        """The registry's answer for ``tier`` (URL -> lease end, unix seconds), applied."""
        offset = self.clock() - self.wall()
        for url, until in found.items():
            self.set_lease(tier, url, until + offset)
        for key in [k for k in self.leases if k[0] == tier and k[1] not in found]:
            del self.leases[key]
