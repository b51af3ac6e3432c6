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
from tests.procs import Gateway, RedisServer, Sim, gateway_cli


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
