"""The Redis connection every stage that keeps state shares, and the Lua scripts it runs.

Calls are bounded: each command has ``timeout_s`` (default 250 ms) for connecting and answering,
so the gateway never hangs on Redis; redis-py reconnects by itself on the next call once Redis is
back. There is no interface over Redis "in case": the scripts are tested against a real server.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

CLIENT_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)
"""What a redis-py call may raise: an error reply, a lost connection, a time-out."""


def connect(url: str, timeout_s: float = 0.25) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        retry=None,
        decode_responses=False,
        health_check_interval=0,
    )


@cache
def lua(name: str) -> str:
    return resources.files("gateway").joinpath("lua", f"{name}.lua").read_text()


def script(client: aioredis.Redis, name: str) -> AsyncScript:
    """An EVALSHA-first script object (it loads the script on NOSCRIPT, after a Redis restart too)."""
    return client.register_script(lua(name))
