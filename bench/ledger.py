"""Ledger benchmark: write a million records the way the gateway does (pipelined batches of the
idempotent write script), then time a report over them and a verify.

    .venv/bin/python -m bench.ledger [--records 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from gateway import ledger_report, store
from gateway.ledger import Ledger, LedgerRecord
from gateway.resp import RespConnection
from tests.factories import ledger_record
from tests.procs import RedisServer

TIERS = (("small", "0.10", "0.40"), ("frontier", "3.00", "15.00"))


def record(i: int, start: float) -> LedgerRecord:
    tier, pin, pout = TIERS[i % 2]
    return ledger_record(
        f"bench-{i}",
        time=start + (i % 30) * 86_400 + i * 0.001,
        tier=tier,
        prompt=400 + i % 500,
        completion=50 + i % 200,
        price_in=pin,
        price_out=pout,
        tenant=f"tenant-{i % 50}",
        key_id="key",
        route=("classify", "summarize", "seo")[i % 3],
        worker="http://w:8000",
        ttfb_ms=12.5,
        latency_ms=250.0,
    )


async def run(url: str, n: int) -> None:
    conn = RespConnection(url, timeout_s=30)
    ledger = Ledger(conn, tempfile.mkdtemp())
    start = time.time() - 30 * 86_400
    t0 = time.perf_counter()
    batch = 512
    pending: list[asyncio.Task[int]] = []
    for i in range(0, n, batch):
        pending.append(asyncio.create_task(ledger.write([record(j, start) for j in range(i, min(n, i + batch))])))
        if len(pending) >= 8:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    write_s = time.perf_counter() - t0
    client = store.connect(url, timeout_s=60)
    t0 = time.perf_counter()
    rows = await ledger_report.report(client, ["day", "tenant", "tier"])
    report_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    problems = await ledger_report.verify(client)
    verify_s = time.perf_counter() - t0
    memory = (await client.info("memory"))["used_memory"] / 2**20
    await client.aclose()
    await conn.close()
    total = sum(r["requests"] for r in rows)
    assert total == n and not problems
    print(
        f"{n:,} records written in {write_s:.1f} s ({n / write_s:,.0f}/s, building records in Python included); "
        f"report over them (day x tenant x tier, {len(rows):,} rows) in {report_s * 1000:.0f} ms; "
        f"verify (scans every record) in {verify_s:.1f} s; Redis memory {memory:,.0f} MiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    args = ap.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp()))
    try:
        asyncio.run(run(server.url, args.records))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
