"""The ledger e2e tests' traffic: the policy, two tenants' keys, and one request of a mixed load
(plain and streaming, some clients leaving early). Shared by ``test_ledger`` and ``test_ledger_page``."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import httpx

from gateway import ledger_report, store, tokens
from gateway.keys import KeyStore
from gateway.settings import RedisMode

POLICY = """version: 1
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{small}"}}]
    price: {{input: 0.10, output: 0.40}}
  frontier:
    model: tiny-frontier
    workers: [{{url: "{f1}"}}, {{url: "{f2}"}}]
    price: {{input: 3.00, output: 15.00}}
    timeouts: {{connect: 1, first_byte: 5, idle: 2}}
routes:
  - {{name: classify, match: {{task: [classification]}}, tier: small}}
  - {{name: default, tier: frontier}}
"""


async def make_keys(url: str, redis_mode: RedisMode = "single") -> dict[str, str]:
    client = store.connect(url, timeout_s=5, mode=redis_mode)
    keys = KeyStore(client)
    out = {t: (await keys.create(t))[1] for t in ("media", "ads")}
    await client.aclose()
    return out


async def one(client: httpx.AsyncClient, url: str, i: int, key: str) -> dict[str, Any]:
    stream = i % 3 != 0
    body: dict[str, Any] = {
        "model": "auto",
        "messages": [{"role": "user", "content": f"article {i}"}],
        "max_tokens": 10 + i % 20,
        "stream": stream,
    }
    if stream and i % 2 == 0:
        body["stream_options"] = {"include_usage": True}
    headers = {"authorization": f"Bearer {key}"}
    if i % 4 == 0:
        headers["x-gateway-task"] = "classification"
    leave_early = stream and i % 10 == 5
    seen: dict[str, Any] = {"i": i, "stream": stream, "left": leave_early, "max_tokens": body["max_tokens"]}
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            seen.update(
                status=r.status_code, id=r.headers.get("x-gateway-request-id"), tier=r.headers.get("x-gateway-tier")
            )
            if not stream or r.status_code != 200:
                data = json.loads(await r.aread())
                seen["usage"] = data.get("usage")
                return seen
            text, usage, events = "", None, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    text += c.get("delta", {}).get("content") or ""
                if "error" in chunk:
                    seen["stream_error"] = True
                events += 1
                if leave_early and events >= 3:
                    break  # the client hangs up mid-stream
            seen["text_tokens"] = tokens.count_text(text)
            seen["usage"] = usage
    except httpx.HTTPError as exc:
        seen.update(status=-1, error=repr(exc))
    return seen


async def traffic(url: str, keys: dict[str, str], n: int, on_half: Any) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    sem = asyncio.Semaphore(40)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=60)) as client:

        async def run(i: int) -> None:
            async with sem:
                if i == n // 2:
                    await asyncio.to_thread(on_half)
                results.append(await one(client, url, i, keys["media" if i % 2 else "ads"]))

        await asyncio.gather(*(run(i) for i in range(n)))
    return results


async def ledger_by_id(url: str, redis_mode: RedisMode = "single") -> dict[str, Any]:
    client = store.connect(url, timeout_s=10, mode=redis_mode)
    records = [r async for r in ledger_report.records(client)]
    problems = await ledger_report.verify(client)
    await client.aclose()
    ids = Counter(r.request_id for r in records)
    assert not [i for i, c in ids.items() if c > 1], "a request was billed twice"
    assert problems == []
    return {r.request_id: r for r in records}
