"""Redis stopped and started again in the middle of traffic: the gateway never hangs on it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from gateway import store
from gateway.keys import KeyStore
from tests.procs import Gateway, RedisServer, Sim

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MSG = [{"role": "user", "content": "hi"}]


def policy_text(sim: Sim, mode: str) -> str:
    return f"""version: 1
on_redis_error: {mode}
expected_replicas: 2
tiers:
  t:
    model: tiny-frontier
    workers: [{{url: "{sim.url}"}}]
    price: {{input: 1, output: 1}}
routes:
  - {{name: default, tier: t}}
limits:
  - {{scope: tenant, rpm: 100000}}
"""


async def traffic(url: str, key: str, seconds: float) -> list[tuple[float, int, float]]:
    """(time sent, status, latency) for sequential requests over ``seconds``."""
    out = []
    async with httpx.AsyncClient(timeout=10) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            r = await client.post(
                f"{url}/v1/chat/completions",
                json={"model": "auto", "messages": MSG},
                headers={"authorization": f"Bearer {key}"},
            )
            out.append((t0, r.status_code, time.monotonic() - t0))
            await asyncio.sleep(0.02)
    return out


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
def test_redis_outage_mid_traffic(tmp_path: Path, mode: str) -> None:
    redis_server = RedisServer(tmp_path, persist=True)
    sim = Sim("tiny-frontier", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(sim, mode))
    gw = Gateway(policy, tmp_path, {"GATEWAY_REDIS_URL": redis_server.url})

    async def scenario() -> tuple[list[tuple[float, int, float]], float, float]:
        client = store.connect(redis_server.url, timeout_s=2)
        _, key = await KeyStore(client).create("media")
        await client.aclose()
        task = asyncio.create_task(traffic(gw.url, key, 4.5))
        await asyncio.sleep(1.5)
        down = time.monotonic()
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(1.5)
        up = time.monotonic()
        await asyncio.to_thread(redis_server.start)
        return await task, down, up

    try:
        results, down, up = asyncio.run(scenario())
    finally:
        gw.stop()
        sim.stop()
        redis_server.stop()

    before = [s for t, s, _ in results if t < down - 0.1]
    during = [s for t, s, _ in results if down + 0.3 < t < up - 0.1]
    after = [s for t, s, _ in results if t > up + 1.0]
    assert before and during and after
    assert set(before) == {200}
    assert set(after) == {200}  # reconnected by itself
    assert max(latency for _, _, latency in results) < 2.0  # never hung on Redis
    logs = [json.loads(x) for x in gw.log.read_text().splitlines() if x.startswith("{")]
    if mode == "fail_closed":
        assert set(during) == {503}
        assert any(e["event"] == "admission_redis_unavailable" for e in logs)
    else:
        assert set(during) == {200}
        # every admission without Redis is logged
        assert sum(1 for e in logs if e["event"] == "admitted_without_redis") >= len(during)
