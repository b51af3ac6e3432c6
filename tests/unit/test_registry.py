"""The worker registry against a real Redis: register, stay alive, deregister, lapse."""

from __future__ import annotations

import asyncio
import contextlib
import time

from gateway.registry import Registration, heartbeat, leases, live_workers, members_key
from gateway.store import connect


async def test_heartbeat_registers_and_deregisters(redis_url: str) -> None:
    client = connect(redis_url, timeout_s=2)
    reg = Registration("http://10.0.0.5:8000", "tiny", "small", time.time())
    task = asyncio.create_task(heartbeat(client, reg, ttl_s=1.0, interval_s=0.1))
    await asyncio.sleep(0.2)
    assert await live_workers(client, "small") == ["http://10.0.0.5:8000"]
    lease = (await leases(client, "small"))["http://10.0.0.5:8000"]
    assert time.time() < lease <= time.time() + 1.0  # when it lapses unless it beats again
    await asyncio.sleep(1.2)  # beats keep it alive past its TTL
    assert await live_workers(client, "small") == ["http://10.0.0.5:8000"]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await live_workers(client, "small") == []  # a clean stop deregisters at once
    await client.zadd(members_key("small"), {"http://10.0.0.6:8000": time.time() - 1})  # a lapsed heartbeat
    assert await live_workers(client, "small") == []
    await client.aclose()
