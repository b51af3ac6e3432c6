from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.resp import RespConnection
from gateway.store import connect
from tests.procs import ClusterServer, Gateway, RedisServer, Sim, two_tier_policy


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def stack(logs: Path) -> Iterator[tuple[Gateway, Sim, Sim, Sim]]:
    """A gateway in front of one small-tier and two frontier-tier simulator workers."""
    small = Sim("tiny-small", logs, "--max-model-len", "1024")
    f1 = Sim("tiny-frontier", logs)
    f2 = Sim("tiny-frontier", logs)
    policy = logs / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [f1.url, f2.url]))
    gw = Gateway(policy, logs)
    try:
        yield gw, small, f1, f2
    finally:
        gw.stop()
        for s in (small, f1, f2):
            s.stop()


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[tuple[Sim, Sim, Sim]]:
    """Fresh simulator workers for one test: one small-tier, two frontier-tier."""
    small, f1, f2 = Sim("tiny-small", tmp_path), Sim("tiny-frontier", tmp_path), Sim("tiny-frontier", tmp_path)
    try:
        yield small, f1, f2
    finally:
        for s in (small, f1, f2):
            s.stop()


@pytest.fixture(scope="session")
def vllm_samples() -> Path:
    """Real responses captured from vLLM 0.32 (``tests/fixtures/vllm-samples``)."""
    return Path(__file__).resolve().parent / "fixtures" / "vllm-samples"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two tiny random-weight models real vLLM serves in the tests (built once a session)."""
    from workers import tiny_model

    root = tmp_path_factory.mktemp("models")
    for size in ("small", "frontier"):
        tiny_model.build(root / size, size)
    return root


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the session's redis-server."""
    import redis

    if redis_server.proc is None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServer]:
    """One real Redis Cluster (3 primaries, 3 replicas) for the whole session, started on first use."""
    cluster = ClusterServer(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: ClusterServer) -> ClusterServer:
    """The session's cluster, healthy and empty (its topology may differ from the start: a failover
    test leaves replicas promoted)."""
    redis_cluster_session.wait_ok()
    redis_cluster_session.flush()
    return redis_cluster_session


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Resource leaks (unclosed sockets, connections) surface in the test that made them, not in a
    later one that happens to trigger garbage collection."""
    yield
    import gc

    gc.collect()


@pytest.fixture
def sdk() -> Iterator[Callable[[str, str], Any]]:
    """openai.OpenAI clients (no SDK retries), closed after the test."""
    import openai

    made: list[openai.OpenAI] = []

    def make(base_url: str, api_key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
async def conns(redis_url: str) -> AsyncIterator[tuple[RespConnection, aioredis.Redis]]:
    """The ledger's two connections to a clean Redis: pipelined RESP (writes) and redis-py (reads)."""
    resp, client = RespConnection(redis_url, timeout_s=2), connect(redis_url, timeout_s=5)
    yield resp, client
    await resp.close()
    await client.aclose()
