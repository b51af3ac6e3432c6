"""Dispatch over httpx.MockTransport: retries before the first byte, fallbacks, pass-through of 4xx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import msgspec
import pytest

from gateway.dispatch import Dispatcher, Trace
from gateway.errors import NoHealthyWorker, WorkerTimeout, WorkerUnavailable
from gateway.policy import RoutingDecision, parse
from gateway.policy.schema import TimeoutRetry
from gateway.pool import WorkerPool
from gateway.schemas import Endpoint, decode_request

POLICY = parse(
    """version: 1
tiers:
  small:
    model: tiny-small
    price: {input: 1, output: 1}
    workers: [{url: "http://s1"}, {url: "http://s2"}, {url: "http://s3"}]
    timeouts: {connect: 1, first_byte: 0.2, idle: 0.2}
  frontier:
    model: tiny-frontier
    price: {input: 1, output: 1}
    workers: [{url: "http://f1"}]
retry: {attempts_per_tier: 2, max_attempts: 4, deadline_s: 5}
routes:
  - {name: r, tier: small, fallback: [frontier]}
""",
    "p.yaml",
)
DECISION = RoutingDecision(POLICY.revision, "r", "small", ("frontier",))
CHAT = decode_request(Endpoint.CHAT, b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "top_k": 2}')
STREAM = decode_request(
    Endpoint.CHAT, b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
)

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
SSE = b'data: {"choices": []}\n\ndata: [DONE]\n\n'


def make(handler: Handler) -> tuple[Dispatcher, WorkerPool, list[str]]:
    seen: list[str] = []

    async def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return await handler(request)

    pool = WorkerPool()
    pool.sync(POLICY)
    return Dispatcher(httpx.MockTransport(record), pool), pool, seen


async def ok(request: httpx.Request) -> httpx.Response:
    body = msgspec.json.decode(request.content)
    return httpx.Response(200, json={"model": body["model"], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})


async def test_success_sends_the_body_with_the_tier_model() -> None:
    captured: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        captured.append(request)
        return await ok(request)

    d, pool, _seen = make(handler)
    up = await d.dispatch(POLICY, DECISION, CHAT, "rid-1")
    assert up.status == 200
    assert up.tier == "small"
    assert up.attempts == 1
    assert msgspec.json.decode(up.body or b"")["model"] == "tiny-small"
    sent = msgspec.json.decode(captured[0].content)
    assert sent["top_k"] == 2
    assert sent["model"] == "tiny-small"
    assert captured[0].headers["x-request-id"] == "rid-1"
    assert captured[0].url.path == "/v1/chat/completions"
    assert pool.inflight(up.worker) == 1
    await up.close()
    await up.close()  # idempotent
    assert pool.inflight(up.worker) == 0


async def test_5xx_retries_next_worker_then_fallback_tier() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host.startswith("s"):
            return httpx.Response(503, text="overloaded")
        return await ok(request)

    d, _, seen = make(handler)
    up = await d.dispatch(POLICY, DECISION, CHAT, "r")
    assert up.tier == "frontier"
    assert up.attempts == 3
    assert len(seen) == 3
    assert seen[-1] == "f1"
    assert len(set(seen[:2])) == 2
    assert msgspec.json.decode(up.body or b"")["model"] == "tiny-frontier"
    await up.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 300, 304, 102])
async def test_redirects_and_interim_answers_are_worker_failures(status: int) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host.startswith("s"):
            return httpx.Response(status, headers={"location": "http://elsewhere/"})
        return await ok(request)

    d, _, seen = make(handler)
    up = await d.dispatch(POLICY, DECISION, CHAT, "r")
    assert (up.status, up.tier, len(seen)) == (200, "frontier", 3)  # failed over, never relayed
    await up.close()


@pytest.mark.parametrize("status", [201, 202, 204, 205, 206, 299])
async def test_a_2xx_other_than_200_is_a_worker_failure(status: int) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host.startswith("s"):
            return httpx.Response(status)  # no body to bill or relay
        if msgspec.json.decode(request.content).get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=SSE)
        return await ok(request)

    d, _, seen = make(handler)
    for parsed in (CHAT, STREAM):
        seen.clear()
        up = await d.dispatch(POLICY, DECISION, parsed, "r")
        assert (up.status, up.tier, len(seen)) == (200, "frontier", 3)  # failed over, never relayed
        await up.close()


@pytest.mark.parametrize(
    ("stream", "content_type", "relayed"),
    [
        (False, "application/json", True),  # vLLM's (tests/fixtures/vllm-samples/chat-response-headers.txt)
        (False, "application/json; charset=utf-8", True),
        (False, "Application/JSON", True),
        (True, "text/event-stream; charset=utf-8", True),  # vLLM's for streams
        (True, "text/event-stream", True),
        (False, "text/html; charset=utf-8", False),  # a proxy's error page with a 200
        (False, "text/event-stream", False),  # a stream to a request that asked for none
        (True, "application/json", False),  # a JSON body, maybe dripped, to a stream request
        (True, "text/plain", False),
        (True, "", False),
    ],
)
async def test_a_200_must_have_the_endpoints_content_type(stream: bool, content_type: str, relayed: bool) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        content = SSE if stream or request.url.host.startswith("s") else b'{"usage": {}}'
        if request.url.host.startswith("s"):
            return httpx.Response(200, headers={"content-type": content_type}, content=content)
        right = "text/event-stream; charset=utf-8" if stream else "application/json"
        return httpx.Response(200, headers={"content-type": right}, content=content)

    d, _, seen = make(handler)
    up = await d.dispatch(POLICY, DECISION, STREAM if stream else CHAT, "r")
    assert (up.tier, len(seen)) == (("small", 1) if relayed else ("frontier", 3))
    await up.close()


async def test_4xx_is_passed_through_without_retry() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens too large", "code": 400}})

    d, _, seen = make(handler)
    up = await d.dispatch(POLICY, DECISION, CHAT, "r")
    assert up.status == 400
    assert len(seen) == 1
    assert b"max_tokens too large" in (up.body or b"")
    await up.close()


async def test_connection_failures_exhaust_attempts_with_502() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    d, _, seen = make(handler)
    with pytest.raises(WorkerUnavailable) as info:
        await d.dispatch(POLICY, DECISION, CHAT, "r")
    assert info.value.status == 502
    assert len(seen) == 3  # two per tier at most: s?, s?, f1


async def test_max_attempts_caps_the_walk() -> None:
    policy = parse(
        POLICY_TEXT_WITH_ATTEMPTS.format(max_attempts=2),
        "p.yaml",
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500)

    d, _, seen = make(handler)
    with pytest.raises(WorkerUnavailable):
        await d.dispatch(policy, DECISION, CHAT, "r")
    assert len(seen) == 2


POLICY_TEXT_WITH_ATTEMPTS = """version: 1
tiers:
  small:
    model: tiny-small
    price: {{input: 1, output: 1}}
    workers: [{{url: "http://s1"}}, {{url: "http://s2"}}, {{url: "http://s3"}}]
  frontier:
    model: tiny-frontier
    price: {{input: 1, output: 1}}
    workers: [{{url: "http://f1"}}]
retry: {{attempts_per_tier: 3, max_attempts: {max_attempts}}}
routes:
  - {{name: r, tier: small, fallback: [frontier]}}
"""


async def test_first_byte_timeout_is_504_and_retried_when_the_policy_allows() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host.startswith("s"):
            await asyncio.sleep(5)
        return await ok(request)

    short = decode_request(
        Endpoint.CHAT, b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}'
    )
    d, _, seen = make(handler)
    up = await d.dispatch(POLICY, DECISION, short, "r")  # a short answer: a time-out means a stuck worker
    assert up.tier == "frontier"
    await up.close()

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        raise AssertionError

    small_only = RoutingDecision(POLICY.revision, "r", "small", ())
    d, _, seen = make(hang)
    with pytest.raises(WorkerTimeout) as info:
        await d.dispatch(POLICY, small_only, STREAM, "r")  # a stream's first byte comes after the prompt
    assert info.value.status == 504
    assert len(seen) == 2  # attempts_per_tier


async def test_a_long_generation_that_times_out_is_not_generated_twice() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        raise AssertionError

    trace = Trace()
    d, _, seen = make(hang)
    with pytest.raises(WorkerTimeout):
        await d.dispatch(POLICY, DECISION, CHAT, "r", trace=trace)  # no max_tokens: the time-out is the generation
    assert seen == ["s1"]
    assert trace.reached is not None and trace.reached.url == "http://s1" and trace.attempts == 1

    always = msgspec.structs.replace(
        POLICY, retry=msgspec.structs.replace(POLICY.retry, on_timeout=TimeoutRetry.ALWAYS)
    )

    async def small_hangs(request: httpx.Request) -> httpx.Response:
        if request.url.host.startswith("s"):
            await asyncio.sleep(5)
        return await ok(request)

    d, _, seen = make(small_hangs)
    up = await d.dispatch(always, DECISION, CHAT, "r")
    await up.close()
    assert seen == ["s1", "s2", "f1"]  # two small workers, then the fallback tier


def test_retry_rule_for_time_outs() -> None:
    rule = POLICY.retry
    assert rule.retries_timeout(stream=True, max_tokens=None)
    assert rule.retries_timeout(stream=False, max_tokens=16)
    assert not rule.retries_timeout(stream=False, max_tokens=17)
    assert not rule.retries_timeout(stream=False, max_tokens=None)
    never = msgspec.structs.replace(rule, on_timeout=TimeoutRetry.NEVER)
    assert not never.retries_timeout(stream=True, max_tokens=1)


async def test_a_refused_connection_never_reached_the_worker() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    trace = Trace()
    d, _, _ = make(refuse)
    with pytest.raises(WorkerUnavailable):
        await d.dispatch(POLICY, DECISION, CHAT, "r", trace=trace)
    assert trace.reached is None and trace.attempts == 3


async def test_no_healthy_worker_is_503_with_retry_after() -> None:
    d, pool, seen = make(ok)
    for w in pool.workers():
        pool.set_health(w, False)
    with pytest.raises(NoHealthyWorker) as info:
        await d.dispatch(POLICY, DECISION, CHAT, "r")
    assert info.value.status == 503
    assert info.value.headers["retry-after"] == "1"
    assert seen == []


async def test_stream_reads_the_first_chunk_and_retries_an_empty_stream() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'data: {"choices": []}\n\n'
        yield b"data: [DONE]\n\n"

    async def empty() -> AsyncIterator[bytes]:
        if False:  # pragma: no cover
            yield b""

    async def handler(request: httpx.Request) -> httpx.Response:
        body = msgspec.json.decode(request.content)
        assert body["stream_options"] == {"include_usage": True}
        if request.url.host == "f1":
            return httpx.Response(200, content=chunks())
        return httpx.Response(200, content=empty())

    d, _, _seen = make(handler)
    up = await d.dispatch(POLICY, DECISION, STREAM, "r")
    assert up.tier == "frontier"
    assert up.first_chunk == b'data: {"choices": []}\n\n'
    assert up.chunks is not None
    assert [c async for c in up.chunks] == [b"data: [DONE]\n\n"]
    await up.close()


async def test_cancellation_releases_the_worker() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        raise AssertionError

    d, pool, _ = make(hang)
    task = asyncio.create_task(d.dispatch(POLICY, DECISION, CHAT, "r"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(pool.inflight(w) == 0 for w in pool.workers())


async def test_priority_goes_to_workers_that_schedule_by_it_and_only_to_them() -> None:
    from gateway.auth import Principal
    from gateway.policy.schema import Priority

    policy = parse(
        """version: 1
tiers:
  small:
    model: tiny-small
    price: {input: 1, output: 1}
    workers: [{url: "http://s1"}]
    scheduling_policy: priority
  frontier:
    model: tiny-frontier
    price: {input: 1, output: 1}
    workers: [{url: "http://f1"}]
routes:
  - {name: r, tier: small, fallback: [frontier], priority: batch}
""",
        "p.yaml",
    )
    bodies: list[dict[str, object]] = []

    async def record(request: httpx.Request) -> httpx.Response:
        bodies.append(msgspec.json.decode(request.content))
        return await ok(request)

    pool = WorkerPool()
    pool.sync(policy)
    d = Dispatcher(httpx.MockTransport(record), pool)
    who = Principal("k", "t")
    small = RoutingDecision(policy.revision, "r", "small", (), priority=Priority.BATCH)
    up = await d.dispatch(policy, small, CHAT, "rid", principal=who)
    await up.close()
    frontier = RoutingDecision(policy.revision, "r", "frontier", (), priority=Priority.BATCH)
    up = await d.dispatch(policy, frontier, CHAT, "rid", principal=who)
    await up.close()
    assert bodies[0]["priority"] == 1  # vLLM: lower runs first
    assert "priority" not in bodies[1]  # a FCFS worker would refuse the field
