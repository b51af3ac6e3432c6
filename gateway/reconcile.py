"""Reconcile the ledger with the workers' own token counters.

``mark`` reads every worker's ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total``
(from its ``/metrics``) and stores the snapshot in Redis with the time. ``compare`` reads them
again and, per worker, sets the counters' growth since the mark beside the tokens the ledger
billed on that worker since then. A difference means traffic that bypassed the gateway, a worker
restart (its counters start again from zero), or tokens a partial stream could only estimate.

    gw:{ledger}:mark      string  JSON {time, workers: {url: [prompt, generation]}}
"""

from __future__ import annotations

import re
import time

import httpx
import msgspec

from gateway import ledger_report
from gateway.store import Client

MARK = "gw:{ledger}:mark"
_SAMPLE = re.compile(r"^(vllm:prompt_tokens_total|vllm:generation_tokens_total)(\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)


class Mark(msgspec.Struct):
    time: float
    workers: dict[str, tuple[float, float]]


class Difference(msgspec.Struct):
    worker: str
    worker_prompt_tokens: float | None  # growth of the worker's counter since the mark (None: unreachable)
    worker_generation_tokens: float | None
    billed_prompt_tokens: int
    billed_completion_tokens: int

    @property
    def matches(self) -> bool:
        return (self.worker_prompt_tokens, self.worker_generation_tokens) == (
            self.billed_prompt_tokens,
            self.billed_completion_tokens,
        )


async def counters(client: httpx.AsyncClient, worker: str) -> tuple[float, float] | None:
    try:
        text = (await client.get(f"{worker}/metrics", timeout=5)).text
    except httpx.HTTPError:
        return None
    totals = {"vllm:prompt_tokens_total": 0.0, "vllm:generation_tokens_total": 0.0}
    for name, _, value in _SAMPLE.findall(text):
        totals[name] += float(value)
    return totals["vllm:prompt_tokens_total"], totals["vllm:generation_tokens_total"]


async def mark(redis: Client, workers: list[str]) -> Mark:
    async with httpx.AsyncClient() as client:
        snapshot = {w: c for w in workers if (c := await counters(client, w)) is not None}
    m = Mark(time.time(), snapshot)
    await redis.set(MARK, msgspec.json.encode(m))
    return m


async def compare(redis: Client) -> tuple[Mark, list[Difference]]:
    raw = await redis.get(MARK)
    if raw is None:
        raise LookupError("no mark yet: run `gateway ledger reconcile --mark` first")
    m = msgspec.json.decode(raw, type=Mark)
    billed: dict[str, list[int]] = {}
    day = time.strftime("%Y-%m-%d", time.gmtime(m.time))
    async for rec in ledger_report.records(redis, since=day):
        if rec.time >= m.time:
            acc = billed.setdefault(rec.worker, [0, 0])
            acc[0] += rec.prompt_tokens
            acc[1] += rec.completion_tokens
    out = []
    async with httpx.AsyncClient() as client:
        for worker in sorted(set(m.workers) | set(billed)):
            now = await counters(client, worker)
            before = m.workers.get(worker)
            grown = (now[0] - before[0], now[1] - before[1]) if now is not None and before is not None else None
            b = billed.get(worker, [0, 0])
            out.append(Difference(worker, grown[0] if grown else None, grown[1] if grown else None, b[0], b[1]))
    return m, out
