"""How many gateway requests one Redis primary sustains: replay the gateway's Redis work per
request — one admission script call (API key + tenant limits: rpm, tpm, concurrency, key rpm),
its ledger record, and its share of the batched settlements — as fast as possible against a redis-server pinned to
one core, and read Redis's own CPU time from INFO. Capacity = requests/s ÷ Redis CPU share.

    .venv/bin/python -m bench.redis_capacity
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import redis

from gateway.admission import Admitter, plan
from gateway.auth import Principal
from gateway.facts import RequestFacts
from gateway.ledger import Ledger, LedgerRecord
from gateway.policy import RoutingDecision, parse
from gateway.resp import RespConnection
from tests.procs import RedisServer

POLICY = parse(
    "version: 1\ntiers:\n  t: {model: m, price: {input: 1, output: 2}}\nroutes:\n  - {name: r, tier: t}\n"
    "limits:\n  - {scope: tenant, rpm: 100000000, tpm: 10000000000, concurrency: 100000}\n"
    "  - {scope: key, rpm: 100000000}\n",
    "bench.yaml",
)


async def drive(url: str, seconds: float, tenants: int = 200, concurrency: int = 256) -> int:
    conn = RespConnection(url, timeout_s=5)
    adm = Admitter(conn, timeout_s=5)
    ledger = Ledger(conn, tempfile.mkdtemp())
    done = 0
    end = time.monotonic() + seconds
    decision = RoutingDecision(POLICY.revision, "r", "t", ())

    async def client(i: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < end:
            tenant = f"tenant-{(i * 7 + n) % tenants}"
            who = Principal(f"key-{tenant}", tenant)
            facts = RequestFacts(tenant, None, "auto", 500, 200, False, {})
            a = await adm.reserve(POLICY, who, facts, decision, f"r{i}-{n}")
            adm.settle(a, 650)
            ledger.record(record(f"r{i}-{n}", tenant))
            n += 1
            done += 1

    async def settler() -> None:
        while time.monotonic() < end:
            await asyncio.sleep(0.01)
            await adm.flush()
            await ledger.flush()

    await asyncio.gather(*(client(i) for i in range(concurrency)), settler())
    await adm.flush()
    await ledger.flush()
    await conn.close()
    assert plan(POLICY, Principal("k", "t"), "t", 1, 1)  # the shape measured: 4 counters
    return done


def record(rid: str, tenant: str) -> LedgerRecord:
    return LedgerRecord(
        request_id=rid,
        time=time.time(),
        tenant=tenant,
        key_id=f"key-{tenant}",
        route="r",
        tier="t",
        model="m",
        worker="http://w:8000",
        policy="v1",
        prompt_tokens=500,
        completion_tokens=150,
        prompt_tokens_estimate=500,
        price_input="1",
        price_output="2",
        cost_usd="0.0008",
        outcome="ok",
        attempts=1,
        ttfb_ms=10.0,
        latency_ms=100.0,
    )


def main() -> None:
    server = RedisServer(Path(tempfile.mkdtemp()), persist=True, core=1, fsync="everysec")
    try:
        r = redis.Redis(port=server.port)
        url = server.url
        asyncio.run(drive(url, 2))  # warm up
        cpu0 = r.info("cpu")
        r.config_resetstat()
        t0 = time.monotonic()
        done = asyncio.run(drive(url, 10))
        elapsed = time.monotonic() - t0
        cpu1 = r.info("cpu")
        calls = sum(v["calls"] for k, v in r.info("commandstats").items() if k in ("cmdstat_evalsha",))
        busy = (cpu1["used_cpu_user"] + cpu1["used_cpu_sys"] - cpu0["used_cpu_user"] - cpu0["used_cpu_sys"]) / elapsed
        rps = done / elapsed
        print(
            f"{rps:,.0f} gateway requests/s replayed; Redis busy {busy * 100:.0f}% of one core; "
            f"{calls / done:.3f} script calls per request; capacity of one Redis primary ≈ "
            f"{rps / busy:,.0f} gateway requests/s (AOF everysec)"
        )
        r.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
