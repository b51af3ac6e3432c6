"""When each worker was up, for GPU-hour cost: intervals in Redis, one sorted set per tier.

Registered workers record themselves with every heartbeat (``registry.beat``): the interval runs
from their registration to their last heartbeat. Static workers are recorded by every gateway
replica from its pool's health checks (``follow``): a streak of passing checks is one interval.
Several replicas record the same worker; readers merge overlapping intervals, so nothing counts twice.

    gw:uptime:<tier>   sorted set   "<start ms>|<worker URL>" scored by the interval's end (unix seconds)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import redis.exceptions
import structlog

from gateway.store import Client

log = structlog.get_logger("gateway.uptime")
Interval = tuple[float, float]


def key(tier: str) -> str:
    return f"gw:uptime:{tier}"


def member(url: str, start: float) -> str:
    return f"{int(start * 1000)}|{url}"


async def record(client: Client, tier: str, url: str, start: float, end: float) -> None:
    """The worker was up from ``start`` to ``end`` (extends an interval with the same start)."""
    await client.zadd(key(tier), {member(url, start): end}, gt=True)


def merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


async def intervals(client: Client, tier: str, since: float, until: float) -> dict[str, list[Interval]]:
    """Per worker URL of the tier, its merged up-intervals clipped to [since, until)."""
    found = await client.zrangebyscore(key(tier), since, "+inf", withscores=True)
    per: dict[str, list[Interval]] = {}
    for entry in found:
        raw, end = entry[0], float(entry[1])
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        start_ms, _, url = text.partition("|")
        start = int(start_ms) / 1000
        if start < until and end > since:
            per.setdefault(url, []).append((max(start, since), min(end, until)))
    return {url: merge(spans) for url, spans in per.items()}


class Streaks:
    """Turns periodic health samples into intervals: a worker seen up again within ``gap_s`` of its
    last sample continues its interval; otherwise a new one starts."""

    def __init__(self, gap_s: float):
        self.gap_s = gap_s
        self._open: dict[tuple[str, str], tuple[float, float]] = {}  # (tier, url) -> (start, last seen)

    def sample(self, up: list[tuple[str, str]], now: float) -> list[tuple[str, str, float, float]]:
        out = []
        for tier, url in up:
            start, last = self._open.get((tier, url), (now, now))
            if now - last > self.gap_s:
                start = now
            self._open[(tier, url)] = (start, now)
            out.append((tier, url, start, now))
        return out


async def follow(
    client: Client,
    up_workers: Callable[[], list[tuple[str, str]]],
    interval_s: float = 5.0,
) -> None:
    """Record the workers ``up_workers()`` names (tier, URL) every ``interval_s`` until cancelled."""
    streaks = Streaks(gap_s=2.5 * interval_s)
    while True:
        spans = streaks.sample(up_workers(), time.time())
        if spans:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                async with client.pipeline(transaction=False) as pipe:
                    for tier, url, start, end in spans:
                        pipe.zadd(key(tier), {member(url, start): end}, gt=True)
                    await pipe.execute()
        await asyncio.sleep(interval_s)
