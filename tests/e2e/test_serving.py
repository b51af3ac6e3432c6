"""End to end: a real gateway process in front of real simulator processes, over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.procs import Gateway, Sim

pytestmark = pytest.mark.e2e

Stack = tuple[Gateway, Sim, Sim, Sim]
MSG = [{"role": "user", "content": "Summarize: the cat sat on the mat."}]


def total_requests(*sims: Sim) -> int:
    return sum(s.stats()["requests"] for s in sims)


def test_chat_is_routed_and_passed_through(stack: Stack) -> None:
    gw, small, _f1, _f2 = stack
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "auto", "messages": MSG, "top_k": 5, "metadata": {"task": "classification", "team": "x"}},
        headers={"authorization": "Bearer anything"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-tier"] == "small"
    assert r.headers["x-gateway-route"] == "classify"
    assert len(r.headers["x-gateway-request-id"]) == 24
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny-small"
    assert body["usage"]["completion_tokens"] == 16
    sent = small.stats()["last_body"]
    assert sent["model"] == "tiny-small"
    assert sent["top_k"] == 5
    assert sent["metadata"] == {"task": "classification", "team": "x"}
    assert "stream_options" not in sent
    assert small.stats()["last_headers"]["X-Request-ID"] == r.headers["x-gateway-request-id"]


def test_task_header_and_default_route(stack: Stack) -> None:
    gw, *_ = stack
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "auto", "messages": MSG},
        headers={"x-gateway-task": "categorization"},
    )
    assert (r.headers["x-gateway-tier"], r.headers["x-gateway-route"]) == ("small", "classify")
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG})
    assert (r.headers["x-gateway-tier"], r.headers["x-gateway-route"]) == ("frontier", "default")
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "small", "messages": MSG})
    assert (r.headers["x-gateway-tier"], r.headers["x-gateway-route"]) == ("small", "small-alias")


def test_completions(stack: Stack) -> None:
    gw, *_ = stack
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": "auto", "prompt": "Once upon", "max_tokens": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 3


def test_stream_without_usage_asked(stack: Stack) -> None:
    gw, *_ = stack
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        json={"model": "auto", "messages": MSG, "stream": True, "max_tokens": 4},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-gateway-tier"] == "frontier"
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)  # the usage chunk was not forwarded
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " the of and to"


def test_openai_sdk_chat_stream_completions_models(stack: Stack, sdk: Callable[[str, str], openai.OpenAI]) -> None:
    gw, *_ = stack
    client = sdk(f"{gw.url}/v1", "sk-test")
    chat = client.chat.completions.create(model="auto", messages=MSG, max_tokens=5)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == " the of and to in"
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 5

    stream = client.chat.completions.create(
        model="auto",
        messages=MSG,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " the of and"

    plain = list(client.chat.completions.create(model="auto", messages=MSG, max_tokens=2, stream=True))  # type: ignore[arg-type]
    assert all(c.usage is None for c in plain)

    comp = client.completions.create(model="auto", prompt="Hello", max_tokens=2)
    assert comp.choices[0].text == " the of"

    raw = client.chat.completions.with_raw_response.create(model="small", messages=MSG)  # type: ignore[arg-type]
    assert raw.headers["x-gateway-tier"] == "small"

    ids = {m.id for m in client.models.list()}
    assert {"auto", "small"} <= ids


def test_openai_sdk_async_stream(stack: Stack) -> None:
    import asyncio

    gw, *_ = stack

    async def go() -> str:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="sk-test", max_retries=0)
        out = ""
        stream = await client.chat.completions.create(model="auto", messages=MSG, max_tokens=3, stream=True)  # type: ignore[arg-type]
        async for chunk in stream:
            if chunk.choices:
                out += chunk.choices[0].delta.content or ""
        await client.close()
        return out

    assert asyncio.run(go()) == " the of and"


def test_openai_sdk_errors(stack: Stack, sdk: Callable[[str, str], openai.OpenAI]) -> None:
    gw, *_ = stack
    client = sdk(f"{gw.url}/v1", "sk-test")
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-99", messages=MSG)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=[])


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b'{"model": "auto", "messages": [', {}, 400, None),
        (b'"just a string"', {}, 400, None),
        (b'{"model": "auto", "messages": "hi"}', {}, 400, None),
        (b'{"model": "auto"}', {}, 400, None),
        (b'{"model": "auto", "messages": [{"role": "user", "content": 5}]}', {}, 400, None),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400, None),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', {}, 404, "model_not_found"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": "x"}', {}, 400, None),
    ],
)
def test_bad_input_is_4xx_and_reaches_no_worker(
    stack: Stack, content: bytes, headers: dict[str, str], status: int, code: str | None
) -> None:
    gw, *sims = stack
    before = total_requests(*sims)
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", content=content, headers={"content-type": "application/json", **headers}
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["message"]
    assert err["code"] == code
    assert r.headers["x-gateway-request-id"]
    assert total_requests(*sims) == before


def test_huge_body_is_413(stack: Stack) -> None:
    gw, *sims = stack
    before = total_requests(*sims)
    big = b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"a" * (1024 * 1024 + 10) + b'"}]}'
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunked() -> object:
        for _ in range(20):
            yield b"a" * 100_000

    r = httpx.post(f"{gw.url}/v1/chat/completions", content=chunked())  # type: ignore[arg-type]
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert total_requests(*sims) == before


def test_worker_4xx_is_passed_through_unchanged(stack: Stack) -> None:
    gw, _small, *_ = stack
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "small", "messages": MSG, "max_tokens": 3000})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "max_tokens=3000 cannot be greater than max_model_len=1024. Please request fewer output tokens. "
            "(parameter=max_tokens, value=3000)",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        }
    }
    assert r.headers["x-gateway-tier"] == "small"


def test_unknown_path_and_method_are_openai_shaped(stack: Stack) -> None:
    gw, *_ = stack
    r = httpx.post(f"{gw.url}/v1/no-such-endpoint", json={})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{gw.url}/v1/chat/completions")
    assert r.status_code == 405
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_health_readiness_models(stack: Stack) -> None:
    gw, *_ = stack
    assert httpx.get(f"{gw.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gw.url}/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["tiers"] == {"small": {"ready_workers": 1}, "frontier": {"ready_workers": 2}}
    models = httpx.get(f"{gw.url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["auto", "small"]


def test_one_log_line_per_request_without_prompt_text(stack: Stack) -> None:
    gw, *_ = stack
    secret = "PROMPT-TEXT-MUST-NOT-BE-LOGGED"
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": secret}]},
        headers={"x-gateway-tenant": "media"},
    )
    rid = r.headers["x-gateway-request-id"]
    time.sleep(0.2)
    lines = [json.loads(line) for line in gw.log_lines() if rid in line]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["event"] == "request"
    assert entry["tenant"] == "media"
    assert entry["route"] == "default"
    assert entry["tier"] == "frontier"
    assert entry["status"] == 200
    assert entry["prompt_tokens"] == entry["prompt_tokens_estimate"] > 0
    assert entry["completion_tokens"] == 16
    assert entry["attempts"] == 1
    assert entry["outcome"] == "ok"
    assert entry["worker"].startswith("http://127.0.0.1:")
    assert entry["ttfb_ms"] > 0
    assert entry["latency_ms"] >= entry["ttfb_ms"]
    assert secret not in gw.log.read_text()
