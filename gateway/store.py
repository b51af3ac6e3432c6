"""The Redis connections every stage that keeps state shares, and the Lua scripts they run.

Two kinds of connection, each for one Redis or for a Redis Cluster (``GATEWAY_REDIS_MODE``):

- ``connect``: redis-py (``Redis``, or ``RedisCluster`` which follows the cluster's slot map by
  itself) — keys, the policy store, the registry, reports, the admin API and the CLI;
- ``pipelined``: the hand-written pipelined connection of the hot path (``resp.RespConnection``,
  or ``cluster.ClusterConnection``: one per primary, chosen by hash slot) — admission, the ledger,
  the response index.

Calls are bounded: each command has ``timeout_s`` (default 250 ms) for connecting and answering,
so the gateway never hangs on Redis; redis-py reconnects by itself on the next call once Redis is
back. There is no interface over Redis "in case": the scripts are tested against a real server
and a real cluster.
"""

from __future__ import annotations

import random
from functools import cache
from importlib import resources

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from gateway.cluster import ClusterConnection
from gateway.resp import Connection, RespConnection
from gateway.settings import RedisMode

CLIENT_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)
"""What a redis-py call may raise: an error reply, a lost connection, a time-out."""

Client = aioredis.Redis | aioredis.RedisCluster


def connect(url: str, timeout_s: float = 0.25, mode: RedisMode = "single") -> Client:
    if mode == "cluster":
        # one retry: a command that meets a failover (a connection refused, MOVED) is sent again once
        # the client has re-read the slot map; more would multiply the time-out
        return aioredis.RedisCluster.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
            health_check_interval=0,
        )
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        retry=None,
        decode_responses=False,
        health_check_interval=0,
    )


def pipelined(url: str, timeout_s: float = 0.25, mode: RedisMode = "single") -> Connection:
    return ClusterConnection(url, timeout_s) if mode == "cluster" else RespConnection(url, timeout_s)


def subscriber(client: Client, url: str, timeout_s: float) -> aioredis.Redis:
    """A connection for pub/sub. In a cluster a PUBLISH reaches every node, so any node will do: a
    random one the client knows (another one at each reconnect, so a dead node is not waited on)."""
    if isinstance(client, aioredis.RedisCluster):
        nodes = client.get_nodes()
        if nodes:
            node = random.choice(nodes)
            return aioredis.Redis(
                host=node.host,
                port=int(node.port),
                username=client.get_connection_kwargs().get("username"),
                password=client.get_connection_kwargs().get("password"),
                socket_connect_timeout=timeout_s,
            )
    return aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s)


@cache
def lua(name: str) -> str:
    return resources.files("gateway").joinpath("lua", f"{name}.lua").read_text()


def script(client: Client, name: str) -> AsyncScript:
    """An EVALSHA-first script object (it loads the script on NOSCRIPT, after a Redis restart too)."""
    return client.register_script(lua(name))
