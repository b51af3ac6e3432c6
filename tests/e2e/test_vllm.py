"""The gateway in front of REAL vLLM (the CPU build, serving a tiny random-weight model), with the
worker started and registered by ``python -m workers launch`` and found through ``discover: redis``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import ledger_report, registry, store
from tests.procs import ROOT, Gateway, RedisServer, free_port
from tests.vllm_stack import LaunchedWorker, profiles_yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1200)]  # incl. the starts

# No max_context on the tier: the gateway cannot know the limit, so vLLM's own 400 must come through.
# The embed tier runs vLLM's pooling runner on the same tiny model (a second worker, started beside
# the first): embeddings, rerank and score go there by the endpoint condition.
POLICY = """version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers: []
    discover: redis
    price: {input: 0.10, output: 0.40}
    timeouts: {connect: 2, first_byte: 30, idle: 30}
  embed:
    model: tiny-embed
    workers: []
    discover: redis
    price: {input: 0.10, output: 0.40, embeddings: 0.02}
    timeouts: {connect: 2, first_byte: 30, idle: 30}
routes:
  - name: embed
    match: {endpoint: [embeddings, rerank, score]}
    tier: embed
  - name: default
    tier: small
"""
MSG = [{"role": "user", "content": "Summarize: the gateway routes requests to tiers."}]


class Stack:
    def __init__(self, gw: Gateway, worker: LaunchedWorker, embedder: LaunchedWorker, redis: RedisServer):
        self.gw, self.worker, self.embedder, self.redis = gw, worker, embedder, redis

    def all_records(self) -> list[Any]:
        """Every ledger record, as written (a request billed twice would appear twice)."""

        async def read() -> list[Any]:
            client = store.connect(self.redis.url, timeout_s=5)
            try:
                return [r async for r in ledger_report.records(client)]
            finally:
                await client.aclose()

        return asyncio.run(read())

    def records(self) -> dict[str, Any]:
        return {r.request_id: r for r in self.all_records()}

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
    profile.write_text(profiles_yaml(tiny_models, {"small": "small", "embed": "small"}, pooling={"embed"}))
    worker = LaunchedWorker(profile, "small", redis.url, tmp)
    embedder = LaunchedWorker(profile, "embed", redis.url, tmp)  # both start at once
    gw: Gateway | None = None
    try:
        worker.wait(timeout=900)  # a minute each on an idle 2-core machine; far more on a shared one
        embedder.wait(timeout=900)
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        gw = Gateway(policy, tmp, {"GATEWAY_REDIS_URL": redis.url})
        deadline = time.monotonic() + 30
        while httpx.get(f"{gw.url}/readyz").status_code != 200:  # the registered worker joined
            assert time.monotonic() < deadline, httpx.get(f"{gw.url}/readyz").text
            time.sleep(0.2)
        yield Stack(gw, worker, embedder, redis)
    finally:
        if gw is not None:
            gw.stop()
        worker.stop()
        embedder.stop()
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
    assert body["id"] == f"chatcmpl-{r.headers['x-gateway-request-id']}"  # vLLM took our X-Request-Id
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


# --- embeddings on a pooling worker ---------------------------------------------------------------


def vllm_counters(worker: LaunchedWorker) -> dict[str, float]:
    """A worker's request and token counters (its /metrics), summed over their labels."""
    names = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    values = dict.fromkeys(names, 0.0)
    for line in httpx.get(f"{worker.url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


def test_embeddings_on_a_pooling_worker_are_routed_and_billed_once(stack: Stack) -> None:
    import openai

    texts = ["the first document", "and a second, somewhat longer document"]
    before = vllm_counters(stack.embedder)
    client = openai.OpenAI(base_url=f"{stack.gw.url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        raw = client.embeddings.with_raw_response.create(model="auto", input=texts)  # the SDK asks for base64
        result = raw.parse()
    finally:
        client.close()
    assert (raw.headers["x-gateway-route"], raw.headers["x-gateway-tier"]) == ("embed", "embed")
    assert [d.index for d in result.data] == [0, 1] and result.model == "tiny-embed"
    assert all(len(d.embedding) == 128 for d in result.data)  # the tiny model's hidden size
    direct = [
        httpx.post(f"{stack.embedder.url}/tokenize", json={"model": "tiny-embed", "prompt": t}, timeout=30).json()
        for t in texts
    ]
    assert result.usage.prompt_tokens == sum(d["count"] for d in direct)  # vLLM counts each item
    record = stack.record_of(_rid(raw.headers))
    assert [r.request_id for r in stack.all_records()].count(record.request_id) == 1
    assert (record.endpoint, record.route, record.tier, record.outcome) == ("embeddings", "embed", "embed", "ok")
    assert (record.prompt_tokens, record.completion_tokens) == (result.usage.prompt_tokens, 0)
    assert record.worker == stack.embedder.url and record.price_input == "0.02"  # the embeddings price
    assert Decimal(record.cost_usd) == Decimal("0.02") * result.usage.prompt_tokens / 1_000_000
    after = vllm_counters(stack.embedder)
    # vLLM runs one engine request per input item: two here, and no more (the gateway sent it once)
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == len(texts)
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == record.prompt_tokens


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/rerank", {"query": "the capital of France", "documents": ["Paris is in France.", "Bananas."], "top_n": 1}),
        ("/v1/score", {"text_1": "France", "text_2": ["Paris is in France.", "Bananas are yellow."]}),
    ],
)
def test_rerank_and_score_on_a_pooling_worker_are_vllms_and_billed(
    stack: Stack, path: str, body: dict[str, Any]
) -> None:
    via_gateway = httpx.post(f"{stack.gw.url}{path}", json=body, timeout=60)  # no model: auto
    direct = httpx.post(f"{stack.embedder.url}{path}", json={"model": "tiny-embed", **body}, timeout=60)
    assert via_gateway.status_code == 200 == direct.status_code, via_gateway.text
    got, want = via_gateway.json(), direct.json()
    assert {k: v for k, v in got.items() if k not in ("id", "created")} == {
        k: v for k, v in want.items() if k not in ("id", "created")
    }  # the same scores, in vLLM's own words
    record = stack.record_of(via_gateway)
    assert (record.endpoint, record.tier, record.completion_tokens) == (path.rsplit("/", 1)[1], "embed", 0)
    assert record.prompt_tokens == want["usage"]["prompt_tokens"]
    assert Decimal(record.cost_usd) == Decimal("0.10") * record.prompt_tokens / 1_000_000  # the input price


# --- done when: every client through one URL, every request billed once ---------------------------


@pytest.fixture(scope="module")
def guidellm() -> Path:
    """guidellm, in its own overlay venv (tests/guidellm_env.py; ``make test`` builds it beforehand)."""
    from tests import guidellm_env

    return guidellm_env.ensure()


PRICES = {"small": (Decimal("0.10"), Decimal("0.40")), "embed": (Decimal("0.02"), Decimal("0.40"))}


def run_guidellm(guidellm: Path, url: str, tokenizer: Path, out: Path, requests: int) -> dict[str, Any]:
    """guidellm with its default backend (openai_http: validation by GET /health, the model from
    /v1/models, streaming chat completions), a short synchronous run; its JSON report."""
    cmd = [str(guidellm), "run", "--backend", f"kind=openai_http,target={url}"]
    cmd += ["--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=4"]
    cmd += ["--tokenizer", f"kind=huggingface_auto,model={tokenizer}"]  # the model is "auto": no hub id
    cmd += ["--profile", "kind=synchronous", "--constraint", f"kind=max_requests,count={requests}"]
    cmd += ["--output", f"kind=json,path={out}", "--disable-console-interactive"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "backend validated with model auto" in r.stdout  # its default check (GET /health) passed
    report: dict[str, Any] = json.loads(out.read_text())["benchmarks"][0]
    return report


def test_done_when_every_client_works_through_one_url_and_each_request_is_billed_once(
    stack: Stack, guidellm: Path, tiny_models: Path, tmp_path: Path
) -> None:
    """Issue 13's "done when", on real vLLM: the openai SDK (chat, completions, embeddings, Responses
    plain and streaming), the anthropic SDK (Messages plain and streaming) and guidellm with its
    default backend, all at one gateway URL; every request exactly once in the ledger, with its
    endpoint, vLLM's token counts and the tier's price."""
    import anthropic
    import openai

    url = stack.gw.url
    started = time.time()  # records of earlier tests still being written arrived before this
    before_ids = {r.request_id for r in stack.all_records()}
    before = {w.url: vllm_counters(w) for w in (stack.worker, stack.embedder)}
    seen: dict[str, tuple[str, bool, int, int]] = {}  # request id -> endpoint, stream, prompt, completion

    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60)
    try:
        raw = oa.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=5)
        u = raw.parse().usage
        seen[raw.headers["x-gateway-request-id"]] = ("chat", False, u.prompt_tokens, u.completion_tokens)
        with oa.chat.completions.with_streaming_response.create(
            model="auto", messages=MSG, max_tokens=5, stream=True, stream_options={"include_usage": True}
        ) as streamed:
            u = list(streamed.parse())[-1].usage
            seen[streamed.headers["x-gateway-request-id"]] = ("chat", True, u.prompt_tokens, u.completion_tokens)
        raw = oa.completions.with_raw_response.create(model="auto", prompt="Categorize: markets rose.", max_tokens=5)
        u = raw.parse().usage
        seen[raw.headers["x-gateway-request-id"]] = ("completions", False, u.prompt_tokens, u.completion_tokens)
        raw = oa.embeddings.with_raw_response.create(model="auto", input=["one text", "another text"])
        u = raw.parse().usage
        seen[raw.headers["x-gateway-request-id"]] = ("embeddings", False, u.prompt_tokens, 0)
        raw = oa.responses.with_raw_response.create(model="auto", input="Say something", max_output_tokens=5)
        ru = raw.parse().usage
        seen[raw.headers["x-gateway-request-id"]] = ("responses", False, ru.input_tokens, ru.output_tokens)
        with oa.responses.with_streaming_response.create(
            model="auto", input=MSG, max_output_tokens=5, stream=True
        ) as streamed:
            ru = list(streamed.parse())[-1].response.usage
            seen[streamed.headers["x-gateway-request-id"]] = ("responses", True, ru.input_tokens, ru.output_tokens)
        raw_msg = claude.messages.with_raw_response.create(model="auto", max_tokens=5, messages=MSG)
        mu = raw_msg.parse().usage
        seen[raw_msg.headers["x-gateway-request-id"]] = ("messages", False, mu.input_tokens, mu.output_tokens)
        with claude.messages.stream(model="auto", max_tokens=5, messages=MSG) as ms:
            mu = ms.get_final_message().usage
            seen[ms.response.headers["x-gateway-request-id"]] = ("messages", True, mu.input_tokens, mu.output_tokens)
    finally:
        oa.close()
        claude.close()

    report = run_guidellm(guidellm, url, tiny_models / "small", tmp_path / "guidellm.json", requests=3)
    runs = report["requests"]["successful"]
    assert len(runs) == 3 and not report["requests"]["errored"] and not report["requests"]["incomplete"]
    for run in runs:  # vLLM names a chat completion after the X-Request-Id the gateway sent it
        rid = run["response_id"].removeprefix("chatcmpl-")
        seen[rid] = ("chat", True, run["prompt_tokens"], run["output_tokens"])

    deadline = time.monotonic() + 15
    while True:  # records are written in batches after the responses
        new = [r for r in stack.all_records() if r.request_id not in before_ids and r.time >= started]
        if len(new) >= len(seen) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(r.request_id for r in new) == sorted(seen)  # each request once, nothing else
    for record in new:
        endpoint, stream, prompt, completion = seen[record.request_id]
        assert (record.endpoint, record.stream, record.outcome) == (endpoint, stream, "ok"), record
        assert (record.prompt_tokens, record.completion_tokens) == (prompt, completion), record
        assert record.tier == ("embed" if endpoint == "embeddings" else "small")
        price_in, price_out = PRICES[record.tier]
        assert Decimal(record.cost_usd) == (price_in * prompt + price_out * completion) / 1_000_000
    # and what the workers themselves counted is what the ledger billed, worker by worker
    for worker in (stack.worker, stack.embedder):
        after = vllm_counters(worker)
        billed = [r for r in new if r.worker == worker.url]
        assert after["vllm:prompt_tokens_total"] - before[worker.url]["vllm:prompt_tokens_total"] == sum(
            r.prompt_tokens for r in billed
        )
        assert after["vllm:generation_tokens_total"] - before[worker.url]["vllm:generation_tokens_total"] == sum(
            r.completion_tokens for r in billed
        )
