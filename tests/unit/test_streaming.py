"""The SSE relay, fed with real vLLM streams cut at every kind of chunk boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.dispatch import Upstream
from gateway.policy import parse
from gateway.pool import Worker, WorkerPool
from gateway.streaming import Outcome, StreamRelay

POLICY = parse(
    'version: 1\ntiers:\n  t: {model: m, price: {input: 1, output: 1}, workers: [{url: "http://w"}]}\n'
    "routes:\n  - {name: r, tier: t}\n",
    "p.yaml",
)


def upstream(pieces: list[bytes], fail_after: bool = False, stall: bool = False) -> Upstream:
    async def gen() -> AsyncIterator[bytes]:
        for p in pieces[1:]:
            yield p
        if fail_after:
            raise httpx.ReadError("connection reset")
        if stall:
            await asyncio.sleep(10)

    pool = WorkerPool()
    pool.sync(POLICY)
    worker = Worker("t", "http://w", "m")
    pool.acquire(worker)
    response = httpx.Response(200)
    return Upstream(pool, worker, 1, response, None, gen(), pieces[0])


def cut(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def run(relay: StreamRelay) -> bytes:
    out = b"".join([c async for c in relay])
    await relay.close()
    return out


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
async def test_usage_chunk_is_read_and_dropped_unless_asked(vllm_samples: Path, size: int) -> None:
    sample = (vllm_samples / "chat-stream-with-usage.sse").read_bytes()
    closed: list[StreamRelay] = []

    async def on_close(r: StreamRelay) -> None:
        closed.append(r)

    relay = StreamRelay(upstream(cut(sample, size)), client_wants_usage=False, idle_timeout=1, on_close=on_close)
    out = await run(relay)
    events = [e for e in sample.split(b"\n\n") if e.strip()]
    usage_event = next(e for e in events if b'"usage"' in e)
    assert out == b"".join(e + b"\n\n" for e in events if e != usage_event)
    assert relay.usage is not None
    assert (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (15, 5)
    assert relay.outcome is Outcome.OK
    assert closed == [relay]


@pytest.mark.parametrize("size", [3, 4096])
async def test_stream_is_relayed_unchanged_when_usage_is_asked(vllm_samples: Path, size: int) -> None:
    for name in ("chat-stream-with-usage.sse", "completions-stream-with-usage.sse"):
        sample = (vllm_samples / name).read_bytes()
        relay = StreamRelay(upstream(cut(sample, size)), client_wants_usage=True, idle_timeout=1, on_close=_noop)
        assert await run(relay) == sample
        assert relay.outcome is Outcome.OK


async def test_worker_failure_mid_stream_ends_with_an_error_event(vllm_samples: Path) -> None:
    sample = (vllm_samples / "chat-stream-with-usage.sse").read_bytes()
    head = sample[: sample.index(b"\n\n") + 2]
    relay = StreamRelay(
        upstream([head, b"data: {"], fail_after=True), client_wants_usage=False, idle_timeout=1, on_close=_noop
    )
    out = await run(relay)
    assert out.startswith(head)
    assert out.endswith(b'"code":"worker_stream_error"}}\n\n')
    assert relay.outcome is Outcome.PARTIAL
    assert relay.usage is None


async def test_idle_worker_times_out(vllm_samples: Path) -> None:
    relay = StreamRelay(
        upstream([b"data: {}\n\n"], stall=True), client_wants_usage=False, idle_timeout=0.05, on_close=_noop
    )
    out = await run(relay)
    assert b"worker_stream_error" in out
    assert relay.outcome is Outcome.PARTIAL


async def test_close_releases_the_worker_once() -> None:
    up = upstream([b"data: [DONE]\n\n"])
    calls: list[Outcome] = []

    async def on_close(r: StreamRelay) -> None:
        calls.append(r.outcome)

    relay = StreamRelay(up, client_wants_usage=False, idle_timeout=1, on_close=on_close)
    await relay.close()  # before iterating: the client went away at once
    await relay.close()
    assert calls == [Outcome.CLIENT_DISCONNECT]
    assert up.pool.inflight(up.worker) == 0


async def _noop(r: StreamRelay) -> None:
    return None
