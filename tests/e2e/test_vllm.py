"""The gateway in front of REAL vLLM (the CPU build, serving a tiny random-weight model), with the
worker started and registered by ``python -m workers launch`` and found through ``discover: redis``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import ledger_report, registry, store
from tests.procs import ROOT, Gateway, RedisServer, free_port
from tests.vllm_stack import LaunchedWorker, profiles_yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(600)]

# No max_context on the tier: the gateway cannot know the limit, so vLLM's own 400 must come through.
POLICY = """version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers: []
    discover: redis
    price: {input: 0.10, output: 0.40}
    timeouts: {connect: 2, first_byte: 30, idle: 30}
routes:
  - name: default
    tier: small
"""
MSG = [{"role": "user", "content": "Summarize: the gateway routes requests to tiers."}]


class Stack:
    def __init__(self, gw: Gateway, worker: LaunchedWorker, redis: RedisServer):
        self.gw, self.worker, self.redis = gw, worker, redis

    def records(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            client = store.connect(self.redis.url, timeout_s=5)
            try:
                return {r.request_id: r async for r in ledger_report.records(client)}
            finally:
                await client.aclose()

        return asyncio.run(read())

    def record_of(self, response: httpx.Response) -> Any:
        rid = response.headers["x-gateway-request-id"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # records are written in batches after the responses
            found = self.records().get(rid)
            if found is not None:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no ledger record for {rid}")

    def vllm_prompt_tokens(self, **body: Any) -> int:
        """vLLM's own count of a prompt (its /tokenize endpoint, same chat template)."""
        r = httpx.post(f"{self.worker.url}/tokenize", json={"model": "tiny-small", **body}, timeout=30)
        r.raise_for_status()
        return int(r.json()["count"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("vllm")
    redis = RedisServer(tmp_path_factory.mktemp("vllm-redis"))
    profile = tmp / "workers.yaml"
    profile.write_text(profiles_yaml(tiny_models, {"small": "small"}))
    worker = LaunchedWorker(profile, "small", redis.url, tmp)
    gw: Gateway | None = None
    try:
        worker.wait()
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        gw = Gateway(policy, tmp, {"GATEWAY_REDIS_URL": redis.url})
        deadline = time.monotonic() + 30
        while httpx.get(f"{gw.url}/readyz").status_code != 200:  # the registered worker joined
            assert time.monotonic() < deadline, httpx.get(f"{gw.url}/readyz").text
            time.sleep(0.2)
        yield Stack(gw, worker, redis)
    finally:
        if gw is not None:
            gw.stop()
        worker.stop()
        redis.stop()


def test_chat_through_the_gateway_counts_tokens_as_vllm_does(stack: Stack) -> None:
    r = httpx.post(
        f"{stack.gw.url}/v1/chat/completions",
        json={"model": "auto", "messages": MSG, "max_tokens": 12},
        headers={"x-gateway-tenant": "media"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-gateway-tier"] == "small" and body["model"] == "tiny-small"
    assert body["system_fingerprint"].startswith("vllm-0.32")  # really vLLM, not the simulator
    usage = body["usage"]
    assert usage["prompt_tokens"] == stack.vllm_prompt_tokens(messages=MSG)
    assert (
        usage["completion_tokens"] <= 12
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    record = stack.record_of(r)
    assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert record.worker == stack.worker.url and record.outcome == "ok" and record.tenant == "media"
    assert record.prompt_tokens_estimate > 0  # the gateway's tiktoken estimate, kept beside vLLM's count


def test_completions_through_the_gateway(stack: Stack) -> None:
    prompt = "Categorize this article: markets rose today."
    r = httpx.post(
        f"{stack.gw.url}/v1/completions", json={"model": "auto", "prompt": prompt, "max_tokens": 8}, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["prompt_tokens"] == stack.vllm_prompt_tokens(prompt=prompt)
    record = stack.record_of(r)
    assert (record.prompt_tokens, record.completion_tokens) == (
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )


def test_streaming_with_usage(stack: Stack) -> None:
    chunks: list[dict[str, Any]] = []
    with httpx.stream(
        "POST",
        f"{stack.gw.url}/v1/chat/completions",
        json={
            "model": "auto",
            "messages": MSG,
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        rid = r.headers["x-gateway-request-id"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    content = [c["choices"][0]["delta"].get("content") for c in chunks[:-1] if c["choices"]]
    assert sum(1 for c in content if c) >= 1
    assert usage["prompt_tokens"] == stack.vllm_prompt_tokens(messages=MSG)
    record = stack.record_of(httpx.Response(200, headers={"x-gateway-request-id": rid}))
    assert record.stream and (record.prompt_tokens, record.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


def test_the_openai_sdk_streams_through_the_gateway(stack: Stack) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{stack.gw.url}/v1", api_key="unused", max_retries=0)
    try:
        stream = client.chat.completions.create(
            model="auto", messages=MSG, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
        events = list(stream)
    finally:
        client.close()
    assert events[-1].usage is not None and events[-1].usage.completion_tokens >= 1


def test_over_long_max_tokens_is_vllms_own_400(stack: Stack) -> None:
    body = {"model": "auto", "messages": MSG, "max_tokens": 100_000}
    via_gateway = httpx.post(f"{stack.gw.url}/v1/chat/completions", json=body, timeout=60)
    direct = httpx.post(f"{stack.worker.url}/v1/chat/completions", json={**body, "model": "tiny-small"}, timeout=60)
    assert direct.status_code == 400
    assert via_gateway.status_code == 400
    assert via_gateway.json() == direct.json()  # unchanged, in vLLM's own words
    assert "max_model_len=4096" in via_gateway.json()["error"]["message"]


def test_models(stack: Stack) -> None:
    listed = httpx.get(f"{stack.gw.url}/v1/models").json()
    assert listed["object"] == "list" and "auto" in [m["id"] for m in listed["data"]]
    served = httpx.get(f"{stack.worker.url}/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in served] == [("tiny-small", 4096)]


def test_vllms_token_counters_match_the_ledger(stack: Stack) -> None:
    """What vLLM counted (its /metrics counters) equals what the ledger billed, request for request."""

    def counters() -> tuple[float, float]:
        text = httpx.get(f"{stack.worker.url}/metrics").text
        values = {}
        for line in text.splitlines():
            for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
                if line.startswith(name + "{"):
                    values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values["vllm:prompt_tokens_total"], values["vllm:generation_tokens_total"]

    before = counters()
    responses = [
        httpx.post(
            f"{stack.gw.url}/v1/chat/completions",
            json={
                "model": "auto",
                "messages": [{"role": "user", "content": f"article {i} " * (i + 1)}],
                "max_tokens": 5 + i,
            },
            timeout=60,
        )
        for i in range(5)
    ]
    assert all(r.status_code == 200 for r in responses)
    records = [stack.record_of(r) for r in responses]
    after = counters()
    assert after[0] - before[0] == sum(r.prompt_tokens for r in records)
    assert after[1] - before[1] == sum(r.completion_tokens for r in records)


def test_the_launcher_registered_the_worker(stack: Stack) -> None:
    async def look() -> tuple[list[str], Any]:
        client = store.connect(stack.redis.url, timeout_s=5)
        try:
            info = await client.hget(registry.info_key("small"), stack.worker.url)
            return await registry.live_workers(client, "small"), json.loads(info)
        finally:
            await client.aclose()

    live, info = asyncio.run(look())
    assert live == [stack.worker.url]
    assert info["model"] == "tiny-small" and info["tier"] == "small" and info["started"] <= time.time()


def test_a_worker_that_fails_to_start_exits_non_zero_with_vllms_last_lines(tmp_path: Path) -> None:
    profile = tmp_path / "workers.yaml"
    profile.write_text(f"version: 1\ntiers:\n  small:\n    model: {tmp_path / 'no-such-model'}\n")
    cmd = [sys.executable, "-m", "workers", "launch", "--profile", str(profile), "--tier", "small"]
    r = subprocess.run(
        [*cmd, "--port", str(free_port()), "--redis", "", "--log-file", str(tmp_path / "vllm.log")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    assert "vLLM exited with code 1 while starting; vLLM's last log lines" in r.stderr
    assert "no-such-model" in r.stderr.split("last log lines", 1)[1]  # vLLM's own error, quoted


# --- issue 13's APIs on real vLLM (the same worker: no second start) ----------------------------
# Embeddings need a pooling runner (a second vLLM start, about a minute of both cores): not here.


def _rid(headers: Any) -> httpx.Response:
    return httpx.Response(200, headers={"x-gateway-request-id": headers["x-gateway-request-id"]})


def test_responses_through_the_openai_sdk_plain_and_streaming(stack: Stack) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{stack.gw.url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        raw = client.responses.with_raw_response.create(model="auto", input=MSG[0]["content"], max_output_tokens=6)
        resp = raw.parse()
        with client.responses.with_streaming_response.create(
            model="auto", input=MSG, max_output_tokens=6, stream=True
        ) as streamed:
            stream_rid = streamed.headers["x-gateway-request-id"]
            events = list(streamed.parse())
    finally:
        client.close()
    assert resp.object == "response" and resp.usage is not None and 1 <= resp.usage.output_tokens <= 6
    record = stack.record_of(_rid(raw.headers))
    assert record.endpoint == "responses" and record.outcome == "ok"
    assert (record.prompt_tokens, record.completion_tokens) == (resp.usage.input_tokens, resp.usage.output_tokens)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    usage = events[-1].response.usage
    record = stack.record_of(_rid({"x-gateway-request-id": stream_rid}))
    assert record.stream and (record.prompt_tokens, record.completion_tokens) == (
        usage.input_tokens,
        usage.output_tokens,
    )


def test_messages_through_the_anthropic_sdk_plain_and_streaming(stack: Stack) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=stack.gw.url, api_key="unused", max_retries=0, timeout=60)
    try:
        raw = client.messages.with_raw_response.create(model="auto", max_tokens=6, messages=MSG)
        msg = raw.parse()
        with client.messages.stream(model="auto", max_tokens=6, messages=MSG) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
            stream_rid = stream.response.headers["x-gateway-request-id"]
        counted = client.messages.count_tokens(model="auto", messages=MSG)
    finally:
        client.close()
    assert msg.type == "message" and 1 <= msg.usage.output_tokens <= 6
    record = stack.record_of(_rid(raw.headers))
    assert record.endpoint == "messages" and record.outcome == "ok"
    assert (record.prompt_tokens, record.completion_tokens) == (msg.usage.input_tokens, msg.usage.output_tokens)
    assert isinstance(text, str) and final.usage.output_tokens >= 1
    record = stack.record_of(_rid({"x-gateway-request-id": stream_rid}))
    assert record.stream and (record.prompt_tokens, record.completion_tokens) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    assert counted.input_tokens == msg.usage.input_tokens


def test_tokenize_through_the_gateway_is_the_workers(stack: Stack) -> None:
    body = {"prompt": "How many tokens is this?"}
    via_gateway = httpx.post(f"{stack.gw.url}/tokenize", json={"model": "auto", **body}, timeout=30)
    direct = httpx.post(f"{stack.worker.url}/tokenize", json={"model": "tiny-small", **body}, timeout=30)
    assert via_gateway.status_code == 200 == direct.status_code
    assert via_gateway.json() == direct.json()
    tokens = {"tokens": direct.json()["tokens"]}
    back = httpx.post(f"{stack.gw.url}/detokenize", json=tokens, timeout=30)
    direct_back = httpx.post(f"{stack.worker.url}/detokenize", json={"model": "tiny-small", **tokens}, timeout=30)
    assert back.status_code == 200 and back.json() == direct_back.json()
