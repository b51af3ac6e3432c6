"""Redis stalled (DEBUG SLEEP) or killed and restarted under load: no false 429s, every counter back
to what the requests in flight explain within seconds, and the ledger equal to what the workers
did, request id by request id."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.ledger import STREAM
from tests.procs import Gateway, RedisServer, Sim

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMIT = 12  # concurrent requests for the tenant; the load stays below it, so any 429 is false
POLICY = """version: 1
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
SLOTS = "gw:{t:default}:rl:0:tenant:c"


def live_slots(server: RedisServer) -> int:
    with redis.Redis(port=server.port, socket_timeout=5) as c:
        sec, us = c.time()
        return int(c.zcount(SLOTS, sec * 1_000_000 + us, "+inf"))


def ledger_ids(server: RedisServer) -> Counter[str]:
    with redis.Redis(port=server.port, socket_timeout=5) as c:
        return Counter(f[b"request_id"].decode() for _, f in c.xrange(STREAM))


async def load(url: str, clients: int, seconds: float) -> Counter[int]:
    codes: Counter[int] = Counter()
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with httpx.AsyncClient(timeout=20) as client:
        end = time.monotonic() + seconds

        async def one() -> None:
            while time.monotonic() < end:
                r = await client.post(f"{url}/v1/chat/completions", json=body)
                codes[r.status_code] += 1

        await asyncio.gather(*(one() for _ in range(clients)))
    return codes


def until(cond: Any, within: float) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > within:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize(("fault", "mode"), [("stall", "fail_closed"), ("restart", "fail_open")])
def test_counters_return_and_the_ledger_matches_after_a_redis_fault(tmp_path: Path, fault: str, mode: str) -> None:
    server = RedisServer(tmp_path, persist=True, debug=True)
    sim = Sim("tiny-frontier", tmp_path, "--ttft-ms", "50")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(mode=mode, url=sim.url, limit=LIMIT))
    gw = Gateway(policy, tmp_path, {"GATEWAY_REDIS_URL": server.url})
    try:

        def inject() -> None:
            time.sleep(1.0)
            if fault == "stall":
                with redis.Redis(port=server.port, socket_timeout=10) as c:
                    c.execute_command("DEBUG", "SLEEP", 1.5)
            else:
                server.stop()
                time.sleep(1.0)
                server.start()

        t = threading.Thread(target=inject)
        t.start()
        codes = asyncio.run(load(gw.url, LIMIT - 2, 4.0))
        t.join()
        assert codes[429] == 0, codes  # never more than LIMIT - 2 in flight: a 429 would be false
        assert codes[200] > 0
        if mode == "fail_open":
            assert set(codes) == {200}, codes
        else:
            assert set(codes) <= {200, 503}, codes
        # once traffic stops, every slot is accounted for within seconds
        took = until(lambda: live_slots(server) == 0, within=5)
        # ... and the tenant can use its whole limit at once
        sim.faults(ttft_ms=1000)

        async def full() -> list[int]:
            async with httpx.AsyncClient(timeout=20) as client:
                body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
                rs = await asyncio.gather(
                    *(client.post(f"{gw.url}/v1/chat/completions", json=body) for _ in range(LIMIT + 1))
                )
                return sorted(r.status_code for r in rs)

        assert asyncio.run(full()) == [200] * LIMIT + [429]
        # the ledger holds one record per request a worker saw, and nothing else
        seen = sim.stats()["outcomes"]
        until(lambda: set(ledger_ids(server)) == set(seen), within=10)
        assert max(ledger_ids(server).values()) == 1
        assert all(len(v) == 1 for v in seen.values())  # no request was generated twice
        print(f"\n{fault}: {dict(codes)}, slots back in {took:.2f}s, {len(seen)} billed = worker requests")
    finally:
        gw.stop()
        sim.stop()
        server.stop()
