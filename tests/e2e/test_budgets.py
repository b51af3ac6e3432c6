"""Budgets through the gateway: reject with insufficient_quota, downgrade to a cheaper tier, route on usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from gateway import ledger_report, store
from gateway.keys import KeyStore
from tests.procs import Gateway, RedisServer, Sim

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

POLICY = """version: 1
tiers:
  small: {{model: tiny-small, workers: [{{url: "{small}"}}], price: {{input: 0.10, output: 0.40}}}}
  frontier: {{model: tiny-frontier, workers: [{{url: "{frontier}"}}], price: {{input: 3.00, output: 15.00}}}}
routes:
  - name: careful
    match: {{budget_used_pct: {{gte: 50}}}}
    tier: small
  - name: default
    tier: frontier
budgets:
  - {{tenant: media, daily_usd: 0.002, action: reject}}
  - {{tenant: ads, daily_usd: 0.002, action: downgrade, downgrade_to: small}}
"""
BODY = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}


def test_budgets(tmp_path: Path, sdk: Callable[[str, str], openai.OpenAI]) -> None:
    redis_server = RedisServer(tmp_path)
    small, frontier = Sim("tiny-small", tmp_path), Sim("tiny-frontier", tmp_path)
    policy = tmp_path / "p.yaml"
    policy.write_text(
        POLICY.format(small=small.url, frontier=frontier.url).replace(
            "  - name: careful\n    match: {budget_used_pct: {gte: 50}}\n    tier: small\n", ""
        )
    )
    gw = Gateway(policy, tmp_path, {"GATEWAY_REDIS_URL": redis_server.url})

    async def keys() -> dict[str, str]:
        client = store.connect(redis_server.url)
        out = {t: (await KeyStore(client).create(t))[1] for t in ("media", "ads")}
        await client.aclose()
        return out

    try:
        k = asyncio.run(keys())

        def post(tenant: str) -> httpx.Response:
            return httpx.post(
                f"{gw.url}/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {k[tenant]}"}
            )

        # each request on frontier: (8 in x $3 + 40 out x $15) / 1M ~ $0.000624 estimated: 3 fit in $0.002
        media = [post("media") for _ in range(5)]
        assert [r.status_code for r in media] == [200, 200, 200, 429, 429]
        err = media[3].json()["error"]
        assert (err["code"], err["type"]) == ("insufficient_quota", "insufficient_quota")
        client = sdk(f"{gw.url}/v1", k["media"])
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])  # type: ignore[arg-type]
        assert info.value.code == "insufficient_quota"

        ads = [post("ads") for _ in range(5)]
        assert [r.status_code for r in ads] == [200] * 5
        routes = [(r.headers["x-gateway-route"], r.headers["x-gateway-tier"]) for r in ads]
        assert routes[:3] == [("default", "frontier")] * 3
        assert routes[3:] == [("default+budget-downgrade", "small")] * 2
        time.sleep(0.5)

        async def ledger_routes() -> list[tuple[str, str, str]]:
            c = store.connect(redis_server.url)
            out = [(r.tenant, r.route, r.tier) async for r in ledger_report.records(c)]
            await c.aclose()
            return out

        recorded = asyncio.run(ledger_routes())
        assert recorded.count(("ads", "default+budget-downgrade", "small")) == 2  # the ledger shows it
        assert sum(1 for t, _, _ in recorded if t == "media") == 3  # refused requests are not billed
        metrics = httpx.get(gw.metrics_url).text
        assert 'gateway_budget_rejections_total{tenant="media"} 3.0' in metrics
    finally:
        gw.stop()

    # routing on budget usage: the same counters, with the `careful` route in the policy
    policy.write_text(POLICY.format(small=small.url, frontier=frontier.url))
    gw = Gateway(policy, tmp_path, {"GATEWAY_REDIS_URL": redis_server.url})
    try:
        time.sleep(1.2)  # usage figures refresh every second
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {k['ads']}"})
        assert (r.headers["x-gateway-route"], r.headers["x-gateway-tier"]) == ("careful", "small")
    finally:
        gw.stop()
        small.stop()
        frontier.stop()
        redis_server.stop()
