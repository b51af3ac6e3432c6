"""Shutdown ends, whatever the background tasks do when they are cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import random
from types import SimpleNamespace
from typing import Any

import redis.asyncio as aioredis

from gateway.app import stop_tasks
from gateway.batching import flush_loop
from gateway.policy.live import PolicyFollower
from gateway.policy.store import PolicyStore


async def test_the_policy_follower_ends_when_cancelled_at_any_moment(redis_url: str) -> None:
    # redis-py could turn a cancellation landing as its pub/sub read timed out into "no message";
    # the follower then ran on and shutdown waited for it forever (with this fast poll, ~1 in 12 before).
    rng = random.Random(11)
    current: Any = lambda: SimpleNamespace(revision="v0")  # noqa: E731
    for _ in range(60):
        listener = aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.25)
        client = aioredis.Redis.from_url(redis_url, socket_timeout=0.25)
        follower = PolicyFollower(current, print, PolicyStore(client), lambda listener=listener: listener, poll_s=0.005)
        task = asyncio.ensure_future(follower.run())
        await asyncio.sleep(rng.uniform(0.02, 0.08))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1)
        assert done, "the policy follower did not end when cancelled"
        await listener.aclose()
        await client.aclose()


async def test_stop_tasks_cancels_again_and_gives_up_at_its_deadline() -> None:
    async def swallows_once() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # as a library that turns a cancellation
            await asyncio.sleep(60)  # into a time-out, then retries, would
        await asyncio.sleep(60)

    stop = False

    async def never_ends() -> None:
        while not stop:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(60)

    stubborn = asyncio.ensure_future(swallows_once())
    hopeless = asyncio.ensure_future(never_ends())
    normal = asyncio.ensure_future(asyncio.sleep(60))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await stop_tasks([stubborn, hopeless, normal], timeout_s=0.5)
    assert 0.5 <= loop.time() - start < 1.0
    assert stubborn.cancelled() and normal.cancelled() and not hopeless.done()
    stop = True
    hopeless.cancel()
    await asyncio.wait([hopeless])


async def test_a_flush_under_way_completes_when_its_loop_is_cancelled() -> None:
    written: list[int] = []
    started = asyncio.Event()

    async def flush() -> None:
        started.set()
        await asyncio.sleep(0.1)  # a write to Redis
        written.append(1)

    wake = asyncio.Event()
    loop_task = asyncio.ensure_future(flush_loop(wake, flush, 0.01))
    await started.wait()
    loop_task.cancel()
    await asyncio.wait([loop_task])
    assert loop_task.cancelled()
    await asyncio.sleep(0.2)
    assert written == [1]  # the batch it had taken off its queue was written, not lost
