"""The SSE relay, fed with real vLLM streams cut at every kind of chunk boundary."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.dispatch import Upstream
from gateway.policy import parse
from gateway.pool import Worker, WorkerPool
from gateway.schemas import Endpoint
from gateway.streaming import COMPACT_BYTES, MAX_EVENT_BYTES, Outcome, StreamRelay, event_data, stream_error
from gateway.transport import HttpxAnswer

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
    return Upstream(pool, worker, 1, HttpxAnswer(httpx.Response(200)), None, gen(), pieces[0])


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
    assert relay.outcome is Outcome.TIMEOUT


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


async def test_a_client_that_hangs_up_after_done_got_a_complete_stream(vllm_samples: Path) -> None:
    """The openai SDK stops reading at [DONE] and may close before the worker ends the response."""
    sample = (vllm_samples / "chat-stream-with-usage.sse").read_bytes()

    async def on_close(r: StreamRelay) -> None:
        pass

    relay = StreamRelay(
        upstream(cut(sample, 50), stall=True), client_wants_usage=True, idle_timeout=5, on_close=on_close
    )
    received = b""
    stream = relay.__aiter__()
    while b"data: [DONE]" not in received:
        received += await anext(stream)
    # as the ASGI response does: ask for more once [DONE] is sent, and get cancelled when the
    # client hangs up while the worker has not closed its side yet
    waiting = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await stream.aclose()
    await relay.close()
    assert relay.outcome is Outcome.OK and relay.usage is not None

    cut_short = StreamRelay(
        upstream(cut(sample, 50), stall=True), client_wants_usage=True, idle_timeout=5, on_close=on_close
    )
    stream = cut_short.__aiter__()
    await anext(stream)  # one piece, then the client leaves
    await stream.aclose()
    await cut_short.close()
    assert cut_short.outcome is Outcome.CLIENT_DISCONNECT


async def test_a_spaced_usage_chunk_is_still_recognized_by_its_meaning() -> None:
    # an OpenAI-compatible worker that is not vLLM: `"choices": []` with a space, `data:` without one
    stream = (
        b'data: {"id": "c1", "choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
        b'data:{"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}\n\n'
        b"data: [DONE]\n\n"
    )
    for wants, expect_usage_event in ((False, False), (True, True)):
        relay = StreamRelay(upstream(cut(stream, 5)), client_wants_usage=wants, idle_timeout=1, on_close=_noop)
        out = await run(relay)
        assert (b'"usage"' in out) is expect_usage_event
        assert b"[DONE]" in out and b'"hi"' in out
        assert relay.usage is not None and (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (7, 1)
        assert relay.outcome is Outcome.OK


async def test_usage_on_a_content_chunk_is_read_but_the_chunk_is_kept() -> None:
    # continuous usage stats: usage rides on chunks that carry text; those are never hidden
    stream = (
        b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": {"prompt_tokens": 3, '
        b'"completion_tokens": 1}}\n\n'
        b"data: [DONE]\n\n"
    )
    relay = StreamRelay(upstream([stream]), client_wants_usage=False, idle_timeout=1, on_close=_noop)
    assert await run(relay) == stream
    assert relay.usage is not None and relay.usage.completion_tokens == 1


@pytest.mark.parametrize(
    ("sample", "endpoint", "response_id"),
    [
        ("responses-stream.sse", Endpoint.RESPONSES, "resp_b8e39ab4f3c45336"),
        ("messages-stream.sse", Endpoint.MESSAGES, None),
    ],
)
@pytest.mark.parametrize("size", [1, 13, 100_000])
async def test_responses_and_messages_streams_give_their_usage_and_pass_unchanged(
    vllm_samples: Path, sample: str, endpoint: Endpoint, response_id: str | None, size: int
) -> None:
    raw = (vllm_samples / sample).read_bytes()
    relay = StreamRelay(
        upstream(cut(raw, size)), endpoint=endpoint, client_wants_usage=False, idle_timeout=1, on_close=_noop
    )
    assert await run(relay) == raw  # these streams' usage is the client's: nothing is hidden
    assert relay.usage is not None and (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (29, 4)
    assert relay.outcome is Outcome.OK and relay.response_id == response_id
    assert relay.relayed_text()  # what a cut stream would be billed by


async def test_a_messages_stream_cut_short_ends_with_anthropics_error_event(vllm_samples: Path) -> None:
    raw = (vllm_samples / "messages-stream.sse").read_bytes()
    head = raw[: raw.index(b"event: message_delta")]
    relay = StreamRelay(
        upstream([head], fail_after=True),
        endpoint=Endpoint.MESSAGES,
        client_wants_usage=False,
        idle_timeout=1,
        on_close=_noop,
    )
    out = await run(relay)
    assert out.endswith(b"\n\n") and b'event: error\ndata: {"type":"error","error":{"type":"api_error"' in out
    assert relay.usage is None and relay.outcome is Outcome.PARTIAL
    assert relay.relayed_text() == "'\ufffd questionos"


@pytest.mark.parametrize(
    ("endpoint", "starts", "error"),
    [
        (Endpoint.CHAT, b"data: ", {"error": {"message": "bye", "type": "api_error", "param": None, "code": "c"}}),
        (
            Endpoint.COMPLETIONS,
            b"data: ",
            {"error": {"message": "bye", "type": "api_error", "param": None, "code": "c"}},
        ),
        (Endpoint.RESPONSES, b"event: error\n", {"type": "error", "code": "c", "message": "bye", "param": None}),
        (Endpoint.MESSAGES, b"event: error\n", {"type": "error", "error": {"type": "api_error", "message": "bye"}}),
    ],
)
def test_a_stream_ending_early_gets_one_error_event_in_its_dialect(
    endpoint: Endpoint, starts: bytes, error: dict[str, object]
) -> None:
    # the relay's worker_stream_error and shutdown's shutting_down (api.RelayResponse) share this
    event = stream_error(endpoint, "bye", "c")
    assert event.startswith(starts) and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    assert json.loads(event_data(event) or b"") == error


def _chat_chunk(i: int) -> bytes:
    return b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"delta":{"content":" w%d"}}]}\n\n' % i


async def test_a_long_stream_keeps_its_text_not_its_events() -> None:
    """What billing needs of a stream that ends without usage is its text: a long stream's events
    are not all kept (they were 40 x 30,000-token streams = 265 MB of gateway memory)."""
    n = 30_000  # ~3 MB of SSE, each chunk a distinct object as a socket gives them

    async def gen() -> AsyncIterator[bytes]:
        for i in range(1, n):
            if i % 100 == 0:
                await asyncio.sleep(0)  # as a socket's reads do: the loop runs (and drops spent timers)
            yield _chat_chunk(i)

    pool = WorkerPool()
    pool.sync(POLICY)
    worker = Worker("t", "http://w", "m")
    pool.acquire(worker)
    up = Upstream(pool, worker, 1, HttpxAnswer(httpx.Response(200)), None, gen(), _chat_chunk(0))
    tracemalloc.start()
    try:
        relay = StreamRelay(up, client_wants_usage=False, idle_timeout=1, on_close=_noop)
        relayed = 0
        async for piece in relay:
            relayed += len(piece)
        retained, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await relay.close()
    assert relayed > 8 * COMPACT_BYTES
    assert retained < 4 * COMPACT_BYTES, retained  # its text (~210 KB) and at most COMPACT_BYTES of events
    # billing stays exact: the same text as if every event had been kept
    assert relay.relayed_text() == "".join(f" w{i}" for i in range(n))
    assert relay.outcome is Outcome.PARTIAL  # no usage came


@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.MESSAGES])
async def test_an_event_past_the_cap_ends_the_stream_without_buffering_it(endpoint: Endpoint) -> None:
    head = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    piece = b"a" * (64 << 10)
    pulled = 0

    async def gen() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield b'data: {"x": "'
        for _ in range(200 * 16):  # a 200 MB line that never ends
            pulled += 1
            yield piece

    pool = WorkerPool()
    pool.sync(POLICY)
    worker = Worker("t", "http://w", "m")
    pool.acquire(worker)
    up = Upstream(pool, worker, 1, HttpxAnswer(httpx.Response(200)), None, gen(), head)
    relay = StreamRelay(up, endpoint=endpoint, client_wants_usage=False, idle_timeout=1, on_close=_noop)
    out = await run(relay)
    assert out.startswith(head)
    assert out.endswith(stream_error(endpoint, f"The worker sent an event larger than {MAX_EVENT_BYTES} bytes."))
    assert b"aaaa" not in out
    assert pulled <= MAX_EVENT_BYTES // len(piece) + 1  # it stopped reading at the cap
    assert relay.outcome is Outcome.PARTIAL
    assert up.pool.inflight(worker) == 0  # closed: the worker's connection is dropped


def _timed(pieces: list[bytes], every: float, forever: bytes | None = None) -> Upstream:
    """A worker that sends ``pieces`` (then ``forever``, repeatedly) one per ``every`` seconds."""

    async def gen() -> AsyncIterator[bytes]:
        for p in pieces[1:]:
            await asyncio.sleep(every)
            yield p
        while forever is not None:
            await asyncio.sleep(every)
            yield forever

    pool = WorkerPool()
    pool.sync(POLICY)
    worker = Worker("t", "http://w", "m")
    pool.acquire(worker)
    return Upstream(pool, worker, 1, HttpxAnswer(httpx.Response(200)), None, gen(), pieces[0])


@pytest.mark.parametrize(
    "drip",
    [b"\n", b": keep-alive\n\n", b"a"],  # blank lines, comments, or an event that never ends
)
async def test_bytes_that_make_no_event_do_not_keep_a_stream_open(drip: bytes) -> None:
    head = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    pieces = [head] if drip != b"a" else [head, b'data: {"choices": "']
    relay = StreamRelay(_timed(pieces, 0.02, drip), client_wants_usage=False, idle_timeout=0.2, on_close=_noop)
    started = time.monotonic()
    out = await asyncio.wait_for(run(relay), 3)  # the worker drips forever: without the idle rule, no end
    assert 0.2 <= time.monotonic() - started < 1.5
    assert out.startswith(head) and out.endswith(
        stream_error(Endpoint.CHAT, "The worker stopped responding mid-stream.")
    )
    assert relay.outcome is Outcome.TIMEOUT


async def test_a_slow_steady_stream_is_not_idle() -> None:
    events = [b'data: {"choices": [{"index": 0, "delta": {"content": "w%d"}}]}\n\n' % i for i in range(8)]
    # each event comes in two reads, 0.06 s apart: 0.12 s per event against an idle time-out of 0.2 s
    pieces = [half for e in events for half in (e[:10], e[10:])] + [b"data: [DONE]\n\n"]
    relay = StreamRelay(_timed(pieces, 0.06), client_wants_usage=False, idle_timeout=0.2, on_close=_noop)
    out = await run(relay)
    assert out == b"".join(events) + b"data: [DONE]\n\n"
    assert relay.outcome is Outcome.PARTIAL  # ended without usage, but not timed out
