"""Prometheus metrics, served at ``GET /metrics`` on their own listener (``gateway/metrics_listener.py``,
``GATEWAY_METRICS_PORT``), never on the serving port: the tenant-labelled series are for operators.

Names follow Prometheus conventions (``_total``, ``_seconds``, base units; money in USD). Label
values are bounded: tier, route and worker come from the policy; status and outcome are small
sets; tenants are the tenants of API keys (under ``auth: none`` any valid name a header gives, so
at most ``MAX_TENANTS`` distinct values are kept per process and the rest count as ``other``).
No request ids, no raw model strings from clients.

Several processes per pod (``gateway serve --workers N``) use prometheus-client's multiprocess
mode: ``gateway serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the
processes start, every process writes its samples there, and a scrape of any process sums them
all. One process (the default) uses the ordinary registry.
"""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.keys import valid_tenant

MAX_TENANTS = 1000
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

REQUESTS = Counter(
    "gateway_requests_total",
    "Requests answered, by tier, route, HTTP status and outcome.",
    ["tier", "route", "status", "outcome"],
)
INPUT_TOKENS = Counter("gateway_input_tokens_total", "Prompt tokens as workers reported them.", ["tier", "tenant"])
OUTPUT_TOKENS = Counter(
    "gateway_output_tokens_total", "Completion tokens as workers reported them.", ["tier", "tenant"]
)
COST = Counter("gateway_cost_usd_total", "Cost at the tier's price, in US dollars.", ["tier", "tenant"])
LATENCY = Histogram(
    "gateway_request_duration_seconds", "Whole request, arrival to last byte.", ["tier"], buckets=LATENCY_BUCKETS
)
TTFB = Histogram(
    "gateway_time_to_first_byte_seconds", "Arrival to the worker's first byte.", ["tier"], buckets=LATENCY_BUCKETS
)
OVERHEAD = Histogram(
    "gateway_overhead_seconds",
    "Time spent in the gateway itself before the worker was called (auth, parsing, tokens, routing, admission).",
    buckets=OVERHEAD_BUCKETS,
)
REJECTIONS = Counter("gateway_rate_limit_rejections_total", "Requests refused by a rate limit.", ["scope", "limit"])
BUDGET_REJECTIONS = Counter("gateway_budget_rejections_total", "Requests refused by a budget.", ["tenant"])
SHED = Counter(
    "gateway_shed_requests_total", "Requests refused with 503 overloaded: the process had GATEWAY_MAX_IN_FLIGHT."
)
RETRIES = Counter("gateway_retries_total", "Dispatch attempts after the first.", ["tier"])
FALLBACKS = Counter("gateway_fallbacks_total", "Requests served by a fallback tier.", ["from_tier", "to_tier"])
WORKER_HEALTHY = Gauge(
    "gateway_worker_healthy",
    "1 if the worker passed its last health check and is not ejected.",
    ["tier", "worker"],
    multiprocess_mode="max",
)
WORKER_INFLIGHT = Gauge(
    "gateway_worker_inflight_requests",
    "Requests this gateway has in flight on the worker.",
    ["tier", "worker"],
    multiprocess_mode="livesum",
)
SLOW_CLIENTS = Counter(
    "gateway_slow_clients_closed_total",
    "Connections closed because the request head or body did not arrive in time (GATEWAY_HEAD_TIMEOUT_S, "
    "GATEWAY_BODY_TIMEOUT_S).",
    ["phase"],
)
HEADS_REFUSED = Counter(
    "gateway_request_heads_refused_total",
    "Requests refused with 431: header bytes (GATEWAY_MAX_HEADER_BYTES) or count (GATEWAY_MAX_HEADERS) over the limit.",
    ["reason"],
)
POLICY = Gauge(
    "gateway_policy_info",
    "The active policy version (value 1 on the active revision's label).",
    ["revision"],
    multiprocess_mode="max",
)


class Recorder:
    """Per-process helper: bounds tenant labels and caches label children (``labels()`` is a dict
    lookup plus locking; the cache makes the per-request cost a few attribute lookups)."""

    def __init__(self) -> None:
        self._tenants: set[str] = set()
        self._children: dict[tuple[object, ...], object] = {}
        self._policy: str | None = None

    def tenant(self, tenant: str) -> str:
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < MAX_TENANTS and valid_tenant(tenant):
            self._tenants.add(tenant)
            return tenant
        return "other"

    def _child(self, metric: Counter | Histogram | Gauge, *labels: str) -> object:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(
        self,
        *,
        tier: str,
        route: str,
        status: int,
        outcome: str,
        tenant: str,
        input_tokens: int,
        output_tokens: int,
        cost_usd: Decimal,
        latency_s: float,
        ttfb_s: float | None,
        overhead_s: float | None,
        attempts: int,
        decided_tier: str,
    ) -> None:
        self._child(REQUESTS, tier, route, str(status), outcome).inc()  # type: ignore[attr-defined]
        t = self.tenant(tenant)
        if input_tokens:
            self._child(INPUT_TOKENS, tier, t).inc(input_tokens)  # type: ignore[attr-defined]
        if output_tokens:
            self._child(OUTPUT_TOKENS, tier, t).inc(output_tokens)  # type: ignore[attr-defined]
        if cost_usd:
            self._child(COST, tier, t).inc(float(cost_usd))  # type: ignore[attr-defined]
        self._child(LATENCY, tier).observe(latency_s)  # type: ignore[attr-defined]
        if ttfb_s is not None:
            self._child(TTFB, tier).observe(ttfb_s)  # type: ignore[attr-defined]
        if overhead_s is not None:
            OVERHEAD.observe(overhead_s)
        if attempts > 1:
            self._child(RETRIES, tier).inc(attempts - 1)  # type: ignore[attr-defined]
        if tier != decided_tier and tier != "-":
            self._child(FALLBACKS, decided_tier, tier).inc()  # type: ignore[attr-defined]

    def rejection(self, scope: str, limit: str) -> None:
        self._child(REJECTIONS, scope, limit).inc()  # type: ignore[attr-defined]

    def budget_rejection(self, tenant: str) -> None:
        self._child(BUDGET_REJECTIONS, self.tenant(tenant)).inc()  # type: ignore[attr-defined]

    def shed(self) -> None:
        SHED.inc()

    def policy(self, revision: str) -> None:
        if self._policy is not None and self._policy != revision:
            POLICY.labels(self._policy).set(0)
        POLICY.labels(revision).set(1)
        self._policy = revision

    def workers(self, states: list[tuple[str, str, bool, int]]) -> None:
        for tier, url, healthy, inflight in states:
            self._child(WORKER_HEALTHY, tier, url).set(1 if healthy else 0)  # type: ignore[attr-defined]
            self._child(WORKER_INFLIGHT, tier, url).set(inflight)  # type: ignore[attr-defined]


def exposition(multiprocess_dir: str | None) -> tuple[bytes, str]:
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
