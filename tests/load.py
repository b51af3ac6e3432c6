"""A bounded load generator for the stress tests and ``bench.faults``: ``connections`` clients on
their own keep-alive connections, each sending ``per_connection`` requests one after another, the
whole run bounded by ``deadline_s``. It tallies what came back, by status and OpenAI error code."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from gateway.ledger import STREAM as LEDGER_STREAM
from tests.procs import ClusterServer, Gateway, RedisServer, Sim, gateway_cli


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)  # "200", "503 overloaded", "ReadTimeout", ...
    latencies_ms: list[float] = field(default_factory=list)  # of the 200s
    shed_without_retry_after: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def count(self, prefix: str) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith(prefix))

    def percentile(self, p: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def _outcome(status: int, body: bytes) -> str:
    if status == 200:
        return "200"
    try:
        code = httpx.Response(status, content=body).json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "?"
    return f"{status} {code}"


async def hammer(
    url: str,
    body: dict[str, Any],
    *,
    connections: int,
    per_connection: int,
    headers: dict[str, str] | None = None,
    deadline_s: float = 60.0,
    request_timeout_s: float = 30.0,
    honor_retry_after: bool = False,
) -> Tally:
    """With ``honor_retry_after`` a client told 503 ``overloaded`` waits its ``Retry-After`` before its
    next request (as the openai SDK backs off); otherwise it sends the next one at once."""
    tally = Tally()
    stream = bool(body.get("stream"))
    # One client (one connection) per simulated user: httpcore's pool does work proportional to its
    # size on every request, so one pool of 1,000 connections would make the load generator the bottleneck.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # unused on http://, but httpx builds one per client (~35 ms) unless given
    start = time.perf_counter()

    async def one(client: httpx.AsyncClient) -> float:
        """One request; returns how long the server asked to wait before the next."""
        t0 = time.perf_counter()
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                content = await r.aread()
        except httpx.HTTPError as exc:
            tally.outcomes[type(exc).__name__] += 1
            return 0.0
        outcome = _outcome(r.status_code, content)
        if outcome == "200" and stream and not content.rstrip().endswith(b"data: [DONE]"):
            outcome = "200 cut short"
        tally.outcomes[outcome] += 1
        if outcome == "200":
            tally.latencies_ms.append((time.perf_counter() - t0) * 1000)
        elif outcome == "503 overloaded":
            if not r.headers.get("retry-after", "").isdigit():
                tally.shed_without_retry_after += 1
                return 0.0
            return float(r.headers["retry-after"])
        return 0.0

    async def user() -> None:
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=request_timeout_s, verify=tls) as client:
            for _ in range(per_connection):
                wait = await one(client)
                if honor_retry_after and wait:
                    await asyncio.sleep(wait)

    tasks = [asyncio.ensure_future(user()) for _ in range(connections)]
    _, late = await asyncio.wait(tasks, timeout=deadline_s)
    for t in late:
        t.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    if late:
        tally.outcomes["unfinished at the deadline"] += len(late)
    tally.seconds = time.perf_counter() - start
    return tally


POLICY = """version: 1
auth: api_key
on_redis_error: {on_redis_error}
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{small}"}}]
    price: {{input: 0.10, output: 0.40}}
    timeouts: {{connect: 2, first_byte: 30, idle: 30}}
  frontier:
    model: tiny-frontier
    workers: [{{url: "{frontier}"}}]
    price: {{input: 3.00, output: 15.00}}
    timeouts: {{connect: 2, first_byte: 30, idle: 30}}
routes:
  - {{name: classify, match: {{task: [classification]}}, tier: small}}
  - {{name: default, tier: frontier}}
limits:
  - {{scope: tenant, rpm: 10000000, tpm: 10000000000, concurrency: 100000}}
"""


class StressStack:
    """A real redis-server (DEBUG allowed), a simulator per tier and an API key whose tenant's limits
    are far above any load here, so every 429 would be a false one. ``gateway()`` starts gateway
    processes on it; ``env`` is what they and the CLI get."""

    def __init__(self, tmp: Path, *sim_args: str, on_redis_error: str = "fail_closed"):
        self.tmp = tmp
        self.redis = RedisServer(tmp, debug=True)
        self.small = Sim("tiny-small", tmp, *sim_args)
        self.frontier = Sim("tiny-frontier", tmp, *sim_args)
        self.policy = tmp / "stress.yaml"
        self.policy.write_text(
            POLICY.format(small=self.small.url, frontier=self.frontier.url, on_redis_error=on_redis_error)
        )
        self.env = {"GATEWAY_REDIS_URL": self.redis.url}
        out = gateway_cli(self.env, "keys", "create", "--tenant", "stress", check=True).stdout.split()
        self.key = out[0]
        self.headers = {"authorization": f"Bearer {self.key}"}

    def gateway(self, **env: str) -> Gateway:
        return Gateway(self.policy, self.tmp, {**self.env, **env})

    def worker_requests(self) -> int:
        return int(self.small.stats()["requests"]) + int(self.frontier.stats()["requests"])

    def ledger_records(self) -> int:
        client = redis.Redis.from_url(self.redis.url)
        try:
            return int(client.xlen(LEDGER_STREAM))
        finally:
            client.close()

    def held_slots(self) -> int:
        """Concurrency slots reserved in Redis (sorted sets of reservation ids, keys ending ``:c``)."""
        client = redis.Redis.from_url(self.redis.url)
        try:
            return sum(int(client.zcard(k)) for k in client.scan_iter("*:c") if client.type(k) == b"zset")
        finally:
            client.close()

    def stop(self) -> None:
        for proc in (self.small, self.frontier, self.redis):
            proc.stop()


def leftovers(gw: Gateway) -> list[int]:
    """Processes still running the gateway started on ``gw``'s port (its own, or any child)."""
    marker = f"--port\0{gw.port}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@dataclass
class Termination:
    exit_s: float  # SIGTERM to the process's exit
    returncode: int | None
    left_behind: list[int]
    load: Tally


async def sigterm_under_load(
    gw: Gateway, body: dict[str, Any], *, connections: int, headers: dict[str, str], after_s: float, wait_s: float
) -> Termination:
    """Start ``connections`` clients (one request each), SIGTERM the gateway ``after_s`` later and
    time its exit (at most ``wait_s``, then it is killed and counted as not exiting)."""
    load = asyncio.ensure_future(
        hammer(gw.url, body, connections=connections, per_connection=1, headers=headers, deadline_s=wait_s + 10)
    )
    await asyncio.sleep(after_s)
    gw.proc.send_signal(signal.SIGTERM)
    start = time.perf_counter()
    try:
        await asyncio.to_thread(gw.proc.wait, wait_s)
    except subprocess.TimeoutExpired:
        gw.proc.kill()
        await asyncio.to_thread(gw.proc.wait)
        return Termination(float("inf"), None, leftovers(gw), await load)
    exit_s = time.perf_counter() - start
    return Termination(exit_s, gw.proc.returncode, leftovers(gw), await load)


@dataclass
class RedisFaultRun:
    """What ``redis_fault_under_load`` saw: statuses during the fault, how long until no slot was
    held once traffic stopped, what a burst at the full limit got afterwards, and the ledger
    against the worker's requests by id."""

    fault: str
    mode: str
    codes: Counter[int]
    slots_back_s: float
    full_limit: list[int]
    worker_ids: dict[str, list[str]]
    ledger_ids: Counter[str]


REDIS_FAULT_POLICY = """version: 1
auth: none
on_redis_error: {mode}
tiers:
  t:
    model: tiny-frontier
    workers: [{{url: "{url}"}}]
    price: {{input: 1, output: 1}}
routes:
  - {{name: default, tier: t}}
limits:
  - {{scope: tenant, concurrency: {limit}, rpm: 100000}}
"""
SLOTS_KEY = "gw:{t:default}:rl:0:tenant:c"


def redis_fault_under_load(tmp: Path, fault: str, mode: str, limit: int = 12, seconds: float = 4.0) -> RedisFaultRun:
    """``limit - 2`` clients loop on a concurrency-limited tenant (so any 429 is false) while Redis
    is stalled 1.5 s (``DEBUG SLEEP``, fault "stall") or killed and restarted 1 s later (fault
    "restart", data kept in its append-only file)."""
    server = RedisServer(tmp, persist=True, debug=True)
    sim = Sim("tiny-frontier", tmp, "--ttft-ms", "50")
    policy = tmp / "policy.yaml"
    policy.write_text(REDIS_FAULT_POLICY.format(mode=mode, url=sim.url, limit=limit))
    gw = Gateway(policy, tmp, {"GATEWAY_REDIS_URL": server.url})
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    def live_slots() -> int:
        with redis.Redis(port=server.port, socket_timeout=5) as c:
            sec, us = c.time()
            return int(c.zcount(SLOTS_KEY, sec * 1_000_000 + us, "+inf"))

    def ledger_ids() -> Counter[str]:
        with redis.Redis(port=server.port, socket_timeout=5) as c:
            return Counter(f[b"request_id"].decode() for _, f in c.xrange(LEDGER_STREAM))

    async def load() -> Counter[int]:
        codes: Counter[int] = Counter()
        async with httpx.AsyncClient(timeout=20) as client:
            end = time.monotonic() + seconds

            async def one() -> None:
                while time.monotonic() < end:
                    r = await client.post(f"{gw.url}/v1/chat/completions", json=body)
                    codes[r.status_code] += 1

            await asyncio.gather(*(one() for _ in range(limit - 2)))
        return codes

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=20) as client:
            rs = await asyncio.gather(
                *(client.post(f"{gw.url}/v1/chat/completions", json=body) for _ in range(limit + 1))
            )
            return sorted(r.status_code for r in rs)

    def inject() -> None:
        time.sleep(1.0)
        if fault == "stall":
            with redis.Redis(port=server.port, socket_timeout=10) as c:
                c.execute_command("DEBUG", "SLEEP", 1.5)
        else:
            server.stop()
            time.sleep(1.0)
            server.start()

    try:
        import threading

        t = threading.Thread(target=inject)
        t.start()
        codes = asyncio.run(load())
        t.join()
        started = time.monotonic()
        while live_slots() and time.monotonic() - started < 10:
            time.sleep(0.05)
        slots_back = time.monotonic() - started
        sim.faults(ttft_ms=1000)  # the burst's requests overlap
        full = asyncio.run(burst())
        seen: dict[str, list[str]] = sim.stats()["outcomes"]
        started = time.monotonic()
        while set(ledger_ids()) != set(seen) and time.monotonic() - started < 10:
            time.sleep(0.05)
        return RedisFaultRun(fault, mode, codes, slots_back, full, seen, ledger_ids())
    finally:
        gw.stop()
        sim.stop()
        server.stop()


@dataclass
class ClusterFailoverRun:
    """What ``cluster_failover_under_load`` saw, with times in seconds from the fault."""

    how: str
    mode: str
    codes: Counter[str]  # outcome -> count (tests.load._outcome's names)
    capped_admitted: int  # 200s of the tenant limited to ``rpm`` requests per minute
    rpm: int
    capped_bound: int  # what GCRA may admit: rpm at once, then one per 60/rpm s (up to the last 200)
    errors_from_s: float | None  # first and last answer that was neither 200 nor 429
    errors_until_s: float | None
    promoted_s: float  # until the replica served the failed primary's slots
    answered_ids: set[str]
    ledger_ids: Counter[str]
    worker_ids: set[str]
    spool_left: int  # spool files still there at the end
    slots_back_s: float  # after traffic: until no concurrency slot was held


CLUSTER_POLICY = (
    REDIS_FAULT_POLICY.split("limits:")[0]
    + "limits:\n  - {{scope: tenant, tenant: {capped}, rpm: {rpm}}}\n  - {{scope: tenant, concurrency: 100}}\n"
)


def _tenant_on(cluster: ClusterServer, port: int, prefix: str) -> str:
    """A tenant name whose keys live on the primary at ``port``."""
    for i in range(10_000):
        if cluster.owner(f"gw:{{t:{prefix}{i}}}:x") == port:
            return f"{prefix}{i}"
    raise LookupError(port)


def cluster_failover_under_load(
    tmp: Path, cluster: ClusterServer, how: str, mode: str = "fail_closed", rpm: int = 20, seconds: float = 6.0
) -> ClusterFailoverRun:
    """Clients loop on two tenants through one gateway on ``cluster`` while the primary that holds
    the ledger (and both tenants' limits) fails: ``how`` = "failover" (``CLUSTER FAILOVER`` on its
    replica: a coordinated switch) or "kill" (SIGKILL; the replica is promoted after the node time-out,
    and the killed node is started again, to rejoin as a replica). One tenant is limited to ``rpm``
    requests per minute, so the run shows whether that limit held through the failover."""
    from gateway.ledger import STREAM

    victim = cluster.owner(STREAM)
    replica = cluster.replica_of(victim)
    capped, bulk = _tenant_on(cluster, victim, "capped"), _tenant_on(cluster, victim, "bulk")
    sim = Sim("tiny-frontier", tmp, "--ttft-ms", "20")
    policy = tmp / "policy.yaml"
    policy.write_text(CLUSTER_POLICY.format(mode=mode, url=sim.url, capped=capped, rpm=rpm))
    # a ledger batch counts once the replica has it too (else it stays in the spool): a killed
    # primary's replica is promoted without whatever it had not received yet
    gw = Gateway(policy, tmp, {**cluster.env, "GATEWAY_LEDGER_WAIT_REPLICAS": "1"})
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    seen: list[tuple[float, str, str, str | None]] = []  # (time, tenant, outcome, request id)
    fault_at = [0.0]
    promoted = [0.0]
    load_started = [0.0]

    async def load() -> None:
        async with httpx.AsyncClient(timeout=20) as client:
            end = time.monotonic() + seconds
            load_started[0] = time.monotonic()

            async def one(n: int) -> None:
                i = 0
                while time.monotonic() < end:
                    tenant = capped if (n + i) % 4 == 0 else bulk
                    i += 1
                    try:
                        r = await client.post(
                            f"{gw.url}/v1/chat/completions", json=body, headers={"x-gateway-tenant": tenant}
                        )
                        outcome, rid = _outcome(r.status_code, r.content), r.headers.get("x-gateway-request-id")
                    except httpx.HTTPError as exc:
                        outcome, rid = type(exc).__name__, None
                    seen.append((time.monotonic(), tenant, outcome, rid))

            await asyncio.gather(*(one(n) for n in range(8)))

    def inject() -> None:
        time.sleep(1.5)
        fault_at[0] = time.monotonic()
        if how == "failover":
            cluster.command(replica, "CLUSTER", "FAILOVER")
        else:
            cluster.kill(victim)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if cluster.command(replica, "ROLE")[0] == b"master":
                    break
            except Exception:
                pass
            time.sleep(0.01)
        promoted[0] = time.monotonic() - fault_at[0]
        if how == "kill":
            cluster.start_node(victim)  # rejoins, as a replica of the promoted one
        cluster.wait_ok()

    def live_slots() -> int:
        port = cluster.owner(f"gw:{{t:{bulk}}}:rl:1:tenant:c")
        sec, us = cluster.command(port, "TIME")
        live = 0
        for tenant in (capped, bulk):
            key = f"gw:{{t:{tenant}}}:rl:1:tenant:c"
            live += int(cluster.command(port, "ZCOUNT", key, int(sec) * 1_000_000 + int(us), "+inf"))
        return live

    def ledger_ids() -> Counter[str]:
        with redis.Redis(port=cluster.owner(STREAM), socket_timeout=5) as c:
            return Counter(f[b"request_id"].decode() for _, f in c.xrange(STREAM))

    spool = tmp / f"spool-{gw.port}"
    try:
        import threading

        t = threading.Thread(target=inject)
        t.start()
        asyncio.run(load())
        t.join()
        started = time.monotonic()
        while live_slots() and time.monotonic() - started < 15:
            time.sleep(0.05)
        slots_back = time.monotonic() - started
        worker_ids = set(sim.stats()["outcomes"])
        answered = {rid for _, _, outcome, rid in seen if outcome == "200" and rid}
        started = time.monotonic()
        while (not answered <= set(ledger_ids()) or list(spool.glob("*"))) and time.monotonic() - started < 20:
            time.sleep(0.1)
        errors = [at - fault_at[0] for at, _, outcome, _ in seen if outcome not in ("200", "429 rate_limit_exceeded")]
        capped_200 = [at for at, tenant, outcome, _ in seen if tenant == capped and outcome == "200"]
        span = (max(capped_200) - load_started[0]) if capped_200 else 0.0
        return ClusterFailoverRun(
            how,
            mode,
            Counter(outcome for _, _, outcome, _ in seen),
            len(capped_200),
            rpm,
            rpm + int(span * rpm / 60),
            min(errors) if errors else None,
            max(errors) if errors else None,
            promoted[0],
            answered,
            ledger_ids(),
            worker_ids,
            len(list(spool.glob("*"))),
            slots_back,
        )
    finally:
        gw.stop()
        sim.stop()
