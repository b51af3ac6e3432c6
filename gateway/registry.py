"""The worker registry: workers announce themselves in Redis, and the gateway finds them there
(`discover: redis`). Workers (the simulator's ``--register``, the vLLM launcher) use ``heartbeat``;
the pool uses ``live_workers``.

A worker registers under its tier with a heartbeat: every ``interval_s`` it pushes its expiry
``ttl_s`` ahead. A worker that stops heart-beating (killed, frozen, partitioned) leaves the pool
within its TTL; one that stops cleanly deregisters at once.

    gw:workers:<tier>        sorted set  worker URL, scored by its expiry (unix seconds)
    gw:workerinfo:<tier>     hash        worker URL -> JSON {url, model, tier, started}
    gw:uptime:<tier>         sorted set  registration → last heartbeat, for GPU-hour cost (gateway/uptime.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import redis.exceptions

from gateway import uptime
from gateway.store import Client


def members_key(tier: str) -> str:
    return f"gw:workers:{tier}"


def info_key(tier: str) -> str:
    return f"gw:workerinfo:{tier}"


class Registration(msgspec.Struct, frozen=True):
    url: str
    model: str
    tier: str
    started: float


async def leases(client: Client, tier: str) -> dict[str, float]:
    """The tier's workers whose heartbeat has not lapsed, each with when it will (unix seconds)
    unless it beats again."""
    found = await client.zrangebyscore(members_key(tier), time.time(), "+inf", withscores=True)
    out: dict[str, float] = {}
    for entry in found:
        url, expiry = entry[0], entry[1]
        out[url.decode() if isinstance(url, bytes) else str(url)] = float(expiry)
    return out


async def live_workers(client: Client, tier: str) -> list[str]:
    """URLs of the tier's workers whose heartbeat has not lapsed."""
    return sorted(await leases(client, tier))


async def beat(client: Client, registration: Registration, ttl_s: float = 5.0) -> None:
    """One heartbeat: the whole registration, alive for ``ttl_s`` more seconds. Raises if Redis
    cannot be reached."""
    tier, url = registration.tier, registration.url
    async with client.pipeline(transaction=False) as pipe:
        pipe.hset(info_key(tier), url, msgspec.json.encode(registration))
        pipe.zadd(members_key(tier), {url: time.time() + ttl_s})
        pipe.zadd(uptime.key(tier), {uptime.member(url, registration.started): time.time()}, gt=True)  # GPU time
        await pipe.execute()


async def heartbeat(client: Client, registration: Registration, ttl_s: float = 5.0, interval_s: float = 1.0) -> None:
    """Register and keep the registration alive until cancelled; then deregister. Redis being
    unreachable for a while is survived: each beat writes the whole registration again."""
    tier, url = registration.tier, registration.url
    try:
        while True:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await beat(client, registration, ttl_s)
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await client.zrem(members_key(tier), url)
            await client.hdel(info_key(tier), url)
