"""What the pool learns in the background: which workers a tier has (DNS names, the worker
registry), whether they are healthy (``/health``) and how loaded (``/metrics``). Nothing here runs
on the request path; each loop writes its findings into the ``WorkerPool``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import httpx
import structlog
from prometheus_client.parser import text_string_to_metric_families

from gateway.pool import EngineLoad, Worker, WorkerPool

log = structlog.get_logger("gateway.pool")

Resolver = Callable[[str, int], Awaitable[list[str]]]
Lookup = Callable[[str], Awaitable[Mapping[str, float]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


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


async def discover(pool: WorkerPool, resolve: Resolver) -> None:
    """Resolve the worker names of tiers with ``discover: dns``; every address becomes a worker
    (a headless Kubernetes Service lists its pods this way). Addresses that disappear leave."""
    policy = pool.policy
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
                addresses = [a for u in pool.discovered.get(tier.name, []) if (a := urlsplit(u).hostname)]
            for address in sorted(set(addresses)):
                netloc = f"[{address}]" if ":" in address else address
                found.append(f"{parts.scheme}://{netloc}:{port}{parts.path.rstrip('/')}")
        if found != pool.discovered.get(tier.name):
            log.info("workers_discovered", tier=tier.name, workers=found)
            pool.discovered[tier.name] = found
            changed = True
    if changed:
        pool.sync(policy)


async def discover_registered(pool: WorkerPool, lookup: Lookup) -> None:
    """Workers registered in Redis for tiers with ``discover: redis`` (URL -> when the lease
    of its last heartbeat ends, unix seconds). A registered worker gets no traffic once its
    lease ends, even before the next lookup: lapsed workers leave within their TTL."""
    policy = pool.policy
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
        pool.leased(tier.name, found)
        urls = sorted(found)
        if urls != pool.discovered.get(tier.name):
            log.info("workers_registered", tier=tier.name, workers=urls)
            pool.discovered[tier.name] = urls
            changed = True
    if changed:
        pool.sync(policy)


async def run_registry(pool: WorkerPool, lookup: Lookup, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await discover_registered(pool, lookup)


async def scrape_once(pool: WorkerPool, client: httpx.AsyncClient, wait_s: float = 1.0) -> None:
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
        pool.observe(w, load)

    await asyncio.gather(*(scrape(w) for w in list(pool.workers())))
    pool.capacity_changed()


async def run_load_scrapes(pool: WorkerPool, client: httpx.AsyncClient, interval: float) -> None:
    while True:
        await scrape_once(pool, client, wait_s=max(interval, 0.5))
        await asyncio.sleep(interval)


async def check_once(pool: WorkerPool, client: httpx.AsyncClient, probe_timeout: float = 2.0) -> None:
    async def probe(w: Worker) -> None:
        try:
            async with asyncio.timeout(probe_timeout):
                r = await client.get(f"{w.url}/health", timeout=probe_timeout)
            ok = r.status_code == 200
        except (httpx.HTTPError, OSError, TimeoutError):
            ok = False
        pool.set_health(w, ok)

    await asyncio.gather(*(probe(w) for w in list(pool.workers())))
    pool.capacity_changed()


async def run_health_checks(
    pool: WorkerPool,
    client: httpx.AsyncClient,
    interval: float,
    report: Callable[[list[tuple[str, str, bool, int]]], None],
    resolve: Resolver | None = None,
) -> None:
    while True:
        await discover(pool, resolve or system_resolver)
        await check_once(pool, client)
        report(pool.states())
        await asyncio.sleep(interval)
