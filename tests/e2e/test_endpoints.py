"""Every vLLM API through one gateway (issue 13): compatibility paths, embeddings, Responses,
Anthropic Messages, rerank/score, tokenize/detokenize — each routed, authenticated, rate-limited
and billed like chat.

One stack for the module: a real redis-server, a small-tier and a frontier-tier simulator, and a
gateway with API keys on (``auth: api_key``), so the key rules are what a deployment has.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Gateway, RedisServer, Sim, gateway_cli

pytestmark = pytest.mark.e2e

POLICY = """version: 1
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{small}"}}]
    price: {{input: 0.10, output: 0.40, embeddings: 0.02, cached_input: 0.025}}
    timeouts: {{connect: 1, first_byte: 5, idle: 2}}
  frontier:
    model: tiny-frontier
    workers: [{{url: "{frontier}"}}]
    price: {{input: 3.00, output: 15.00}}
    timeouts: {{connect: 1, first_byte: 5, idle: 2}}
routes:
  - {{name: embed, match: {{endpoint: [embeddings]}}, tier: small}}
  - {{name: rerank, match: {{endpoint: [rerank]}}, tier: small}}
  - {{name: classify, match: {{task: [classification]}}, tier: small}}
  - {{name: small-alias, match: {{model: [small]}}, tier: small}}
  - {{name: default, tier: frontier}}
limits:
  - {{scope: key, tenant: small-tpm, tpm: 100}}
"""


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        # both report prefix-cache hits in usage, as vLLM does with this flag
        self.small = Sim("tiny-small", tmp, "--enable-prompt-tokens-details")
        self.frontier = Sim("tiny-frontier", tmp, "--enable-prompt-tokens-details")
        self.env = {"GATEWAY_REDIS_URL": self.redis.url}
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY.format(small=self.small.url, frontier=self.frontier.url))
        self.gw = Gateway(policy, tmp, self.env)
        self.key = self.new_key("acme")
        self.auth = {"authorization": f"Bearer {self.key}"}

    def new_key(self, tenant: str) -> str:
        r = gateway_cli(self.env, "keys", "create", "--tenant", tenant, "--label", "t", check=True)
        return r.stdout.strip()

    def ledger(self, request_id: str, timeout: float = 5.0) -> dict[str, str]:
        """The ledger record of one request, once it is written (records are batched)."""
        import redis

        client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for _, fields in client.xrange("gw:{ledger}:records"):
                    if fields["request_id"] == request_id:
                        return dict(fields)
                time.sleep(0.05)
        finally:
            client.close()
        raise AssertionError(f"no ledger record for {request_id}")

    def stop(self) -> None:
        self.gw.stop()
        self.small.stop()
        self.frontier.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("endpoints"))
    yield s
    s.stop()


# --- compatibility ------------------------------------------------------------------------------


def test_health_beside_healthz(stack: Stack) -> None:
    for path in ("/health", "/healthz"):
        r = httpx.get(f"{stack.gw.url}{path}")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert r.headers["x-gateway-request-id"]


def test_models_retrieve_with_the_list_key_rule(stack: Stack, sdk: Any) -> None:
    url = stack.gw.url
    assert httpx.get(f"{url}/v1/models/small").status_code == 401  # as the list: a key is needed
    r = httpx.get(f"{url}/v1/models/small", headers={"authorization": "Bearer gk_wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    client = sdk(f"{url}/v1", stack.key)
    assert client.models.retrieve("small").id == "small"
    assert client.models.retrieve("auto").object == "model"
    r = httpx.get(f"{url}/v1/models/org/no-such-model", headers=stack.auth)
    assert r.status_code == 404
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")
    assert "org/no-such-model" in error["message"]
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/models", 200),
        ("GET", "/v1/models", 401),
        ("GET", "/healthz", 200),
        ("GET", "/readyz", 200),
        ("GET", "/openapi.json", 200),
        ("GET", "/no/such/path", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("GET", "/admin/keys", 403),
        ("POST", "/v1/chat/completions", 401),
    ],
)
def test_every_response_carries_a_request_id(stack: Stack, method: str, path: str, status: int) -> None:
    headers = stack.auth if status != 401 and path.startswith("/v1/") else {}
    r = httpx.request(method, f"{stack.gw.url}{path}", headers=headers)
    assert r.status_code == status, r.text
    assert len(r.headers["x-gateway-request-id"]) == 24


def test_the_request_id_reaches_the_worker_as_x_request_id(stack: Stack) -> None:
    r = httpx.post(
        f"{stack.gw.url}/v1/chat/completions",
        json={"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers=stack.auth,
    )
    assert r.status_code == 200
    rid = r.headers["x-gateway-request-id"]
    assert stack.small.stats()["outcomes"][rid] == ["completed"]  # the simulator files outcomes by X-Request-Id


@pytest.mark.parametrize("wants_usage", [False, True])
def test_a_spaced_usage_chunk_is_hidden_unless_asked_and_still_billed(stack: Stack, wants_usage: bool) -> None:
    """A worker writing `"choices": []` with a space (not vLLM's byte layout): the usage chunk is
    recognised by what it means, hidden from a client that did not ask for it, and billed."""
    stack.small.faults(spaced_json=True)
    try:
        body: dict[str, Any] = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        body |= {"stream": True} | ({"stream_options": {"include_usage": True}} if wants_usage else {})
        with httpx.stream("POST", f"{stack.gw.url}/v1/chat/completions", json=body, headers=stack.auth) as r:
            assert r.status_code == 200
            raw = r.read()
    finally:
        stack.small.faults(spaced_json=False)
    assert b'"choices": [{' in raw  # the worker's own spacing went through unchanged
    assert (b'"usage"' in raw) is wants_usage and raw.endswith(b"data: [DONE]\n\n")
    rec = stack.ledger(r.headers["x-gateway-request-id"])
    assert rec["outcome"] == "ok" and int(rec["completion_tokens"]) == 3 and int(rec["prompt_tokens"]) > 0


# --- embeddings ---------------------------------------------------------------------------------


def test_embeddings_through_the_openai_sdk_are_routed_and_billed(stack: Stack, sdk: Any) -> None:
    from gateway import tokens

    client = sdk(f"{stack.gw.url}/v1", stack.key)
    texts = ["the first document", "and a second, somewhat longer document"]
    raw = client.embeddings.with_raw_response.create(model="auto", input=texts)  # the SDK asks for base64
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 16 for d in result.data)
    expected = sum(tokens.count_text(t) for t in texts)  # counted per item
    assert result.usage.prompt_tokens == expected
    assert (raw.headers["x-gateway-route"], raw.headers["x-gateway-tier"]) == ("embed", "small")
    rec = stack.ledger(raw.headers["x-gateway-request-id"])
    assert rec["endpoint"] == "embeddings" and rec["route"] == "embed" and rec["outcome"] == "ok"
    assert (int(rec["prompt_tokens"]), int(rec["completion_tokens"])) == (expected, 0)
    assert int(rec["prompt_tokens_estimate"]) == expected
    assert rec["price_input"] == "0.02"  # the tier's embeddings price, not its input price
    assert Decimal(rec["cost_usd"]) == Decimal("0.02") * expected / 1_000_000
    assert stack.small.stats()["last_body"]["model"] == "tiny-small"


@pytest.mark.parametrize(
    ("value", "count"),
    [("one text", None), (["a b", "c"], None), ([1, 2, 3, 4], 4), ([[1, 2], [3, 4, 5]], 5)],
)
def test_embedding_inputs_are_counted_per_item(stack: Stack, value: Any, count: int | None) -> None:
    from gateway import tokens

    items = [value] if isinstance(value, str) else value
    expected = count if count is not None else sum(tokens.count_text(t) for t in items)
    r = httpx.post(f"{stack.gw.url}/v1/embeddings", json={"model": "auto", "input": value}, headers=stack.auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and len(body["data"]) == (1 if isinstance(value, str) or count == 4 else 2)
    assert body["usage"]["prompt_tokens"] == expected
    rec = stack.ledger(r.headers["x-gateway-request-id"])
    assert int(rec["prompt_tokens_estimate"]) == expected == int(rec["prompt_tokens"])


def test_embeddings_reserve_input_tokens_only(stack: Stack) -> None:
    key = stack.new_key("small-tpm")  # tpm 100: a chat's default 256 output tokens alone would not fit
    headers = {"authorization": f"Bearer {key}"}
    r = httpx.post(f"{stack.gw.url}/v1/embeddings", json={"model": "auto", "input": "ten tokens"}, headers=headers)
    assert r.status_code == 200, r.text
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 100 - r.json()["usage"]["prompt_tokens"]
    chat = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{stack.gw.url}/v1/chat/completions", json=chat, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_over_limit"  # can never fit 100 tpm


@pytest.mark.parametrize(
    ("body", "param"),
    [({"model": "auto"}, "input"), ({"model": "auto", "input": [1.5]}, "input"), ({"input": "x"}, "model")],
)
def test_bad_embedding_requests_are_400(stack: Stack, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{stack.gw.url}/v1/embeddings", json=body, headers=stack.auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


# --- Responses API ------------------------------------------------------------------------------


def test_responses_plain_through_the_openai_sdk_and_billed(stack: Stack, sdk: Any) -> None:
    client = sdk(f"{stack.gw.url}/v1", stack.key)
    raw = client.responses.with_raw_response.create(model="small", input="Say something", max_output_tokens=5)
    resp = raw.parse()
    assert resp.id.startswith("resp_") and resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens == 5
    assert raw.headers["x-gateway-tier"] == "small"
    rec = stack.ledger(raw.headers["x-gateway-request-id"])
    assert rec["endpoint"] == "responses" and rec["outcome"] == "ok"
    assert (int(rec["prompt_tokens"]), int(rec["completion_tokens"])) == (resp.usage.input_tokens, 5)
    assert int(rec["prompt_tokens_estimate"]) == resp.usage.input_tokens  # the sim counts as the gateway does


def test_responses_streaming_through_the_openai_sdk(stack: Stack, sdk: Any) -> None:
    client = sdk(f"{stack.gw.url}/v1", stack.key)
    with client.responses.with_streaming_response.create(
        model="auto", input=[{"role": "user", "content": "hello"}], max_output_tokens=4, stream=True
    ) as raw:
        rid = raw.headers["x-gateway-request-id"]
        events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = events[-1].response
    assert completed.usage.output_tokens == 4 and text == completed.output_text
    rec = stack.ledger(rid)
    assert rec["endpoint"] == "responses" and rec["outcome"] == "ok" and rec["stream"] == "1"
    assert (int(rec["prompt_tokens"]), int(rec["completion_tokens"])) == (completed.usage.input_tokens, 4)


def test_a_response_is_retrieved_and_cancelled_on_the_worker_that_holds_it(stack: Stack, sdk: Any) -> None:
    client = sdk(f"{stack.gw.url}/v1", stack.key)
    made = client.responses.create(model="small", input="remember me", max_output_tokens=2)  # the small tier
    deadline = time.monotonic() + 5
    while True:  # the index is written after the response, off the client's path
        r = httpx.get(f"{stack.gw.url}/v1/responses/{made.id}", headers=stack.auth)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert r.status_code == 200 and r.json()["id"] == made.id
    assert stack.small.stats()["outcomes"][r.headers["x-gateway-request-id"]] == ["retrieved"]
    assert client.responses.retrieve(made.id).output_text == made.output_text
    cancel = httpx.post(f"{stack.gw.url}/v1/responses/{made.id}/cancel", headers=stack.auth)
    assert cancel.status_code == 400  # vLLM's answer for a finished, synchronous response, passed through
    assert stack.small.stats()["outcomes"][cancel.headers["x-gateway-request-id"]] == ["cancel"]
    # another tenant's key cannot reach it; unknown ids are 404 in OpenAI's shape
    other = {"authorization": f"Bearer {stack.new_key('someone-else')}"}
    for headers, rid in ((other, made.id), (stack.auth, "resp_unknown")):
        r = httpx.get(f"{stack.gw.url}/v1/responses/{rid}", headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{stack.gw.url}/v1/responses/{made.id}").status_code == 401


# --- Anthropic Messages -------------------------------------------------------------------------


@pytest.fixture
def claude(stack: Stack) -> Iterator[Any]:
    import anthropic

    client = anthropic.Anthropic(base_url=stack.gw.url, api_key=stack.key, max_retries=0)  # sends x-api-key
    yield client
    client.close()


def test_messages_through_the_anthropic_sdk(stack: Stack, claude: Any) -> None:
    raw = claude.messages.with_raw_response.create(
        model="small", max_tokens=6, system="Be brief.", messages=[{"role": "user", "content": "hello"}]
    )
    msg = raw.parse()
    assert msg.type == "message" and msg.content[0].text
    assert msg.usage.output_tokens == 6
    rec = stack.ledger(raw.headers["x-gateway-request-id"])
    assert rec["endpoint"] == "messages" and rec["tier"] == "small" and rec["outcome"] == "ok"
    assert (int(rec["prompt_tokens"]), int(rec["completion_tokens"])) == (msg.usage.input_tokens, 6)
    assert int(rec["prompt_tokens_estimate"]) == msg.usage.input_tokens


def test_messages_streaming_through_the_anthropic_sdk(stack: Stack, claude: Any) -> None:
    with claude.messages.stream(model="auto", max_tokens=4, messages=[{"role": "user", "content": "hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["x-gateway-request-id"]
    assert text and final.usage.output_tokens == 4
    rec = stack.ledger(rid)
    assert rec["endpoint"] == "messages" and rec["outcome"] == "ok" and rec["stream"] == "1"
    assert (int(rec["prompt_tokens"]), int(rec["completion_tokens"])) == (final.usage.input_tokens, 4)


def test_count_tokens_is_routed_and_not_billed(stack: Stack, claude: Any) -> None:
    counted = claude.messages.count_tokens(model="small", messages=[{"role": "user", "content": "count me"}])
    assert counted.input_tokens > 0


def test_messages_errors_are_in_anthropics_shape(stack: Stack, claude: Any) -> None:
    import anthropic

    url = f"{stack.gw.url}/v1/messages"
    body = {"model": "small", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(url, json=body)  # no key
    assert r.status_code == 401
    assert r.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": r.json()["error"]["message"]},
    }
    r = httpx.post(url, json={**body, "model": "nope"}, headers={"x-api-key": stack.key})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(url, headers={"x-api-key": stack.key})
    assert r.status_code == 405 and r.json()["type"] == "error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    bad = anthropic.Anthropic(base_url=stack.gw.url, api_key="gk_wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="small", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    bad.close()


# --- rerank, score, tokenize, detokenize --------------------------------------------------------

DOCS = ["Paris is the capital of France.", "Berlin is in Germany.", "Bananas are yellow."]


def _pair_tokens(query: str, docs: list[str]) -> int:
    from gateway import tokens

    return sum(tokens.count_text(query) + tokens.count_text(d) for d in docs)  # each pair is encoded


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_rerank_is_routed_and_billed_by_input_tokens(stack: Stack, path: str) -> None:
    query = "the capital of France"
    body = {"model": "auto", "query": query, "documents": DOCS, "top_n": 2}
    r = httpx.post(f"{stack.gw.url}{path}", json=body, headers=stack.auth)
    assert r.status_code == 200, r.text
    answer = r.json()
    expected = _pair_tokens(query, DOCS)
    assert answer["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    assert len(answer["results"]) == 2
    assert all(res["document"]["text"] == DOCS[res["index"]] for res in answer["results"])
    assert (r.headers["x-gateway-route"], r.headers["x-gateway-tier"]) == ("rerank", "small")  # endpoint: [rerank]
    rec = stack.ledger(r.headers["x-gateway-request-id"])
    assert rec["endpoint"] == "rerank" and rec["outcome"] == "ok"
    assert (int(rec["prompt_tokens"]), int(rec["completion_tokens"])) == (expected, 0)
    assert int(rec["prompt_tokens_estimate"]) == expected
    assert rec["price_input"] == "0.10"  # the tier's input price (its embeddings price is for embeddings)
    assert Decimal(rec["cost_usd"]) == Decimal("0.10") * expected / 1_000_000
    assert stack.small.stats()["last_body"]["model"] == "tiny-small"


@pytest.mark.parametrize(
    ("path", "pair"),
    [("/score", ("queries", "documents")), ("/v1/score", ("text_1", "text_2")), ("/score", ("data_1", "data_2"))],
)
def test_score_is_routed_and_billed_by_input_tokens(stack: Stack, path: str, pair: tuple[str, str]) -> None:
    query = "France"
    r = httpx.post(f"{stack.gw.url}{path}", json={pair[0]: query, pair[1]: DOCS}, headers=stack.auth)  # no model
    assert r.status_code == 200, r.text
    answer = r.json()
    expected = _pair_tokens(query, DOCS)
    assert answer["object"] == "list" and [d["index"] for d in answer["data"]] == [0, 1, 2]
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["total_tokens"]) == (expected, expected)
    assert r.headers["x-gateway-tier"] == "frontier"  # no model is "auto": the default route
    rec = stack.ledger(r.headers["x-gateway-request-id"])
    assert rec["endpoint"] == "score" and int(rec["prompt_tokens"]) == expected == int(rec["prompt_tokens_estimate"])
    assert Decimal(rec["cost_usd"]) == Decimal("3.00") * expected / 1_000_000


@pytest.mark.parametrize(("task", "tier"), [("classification", "small"), (None, "frontier")])
def test_tokenize_is_answered_by_the_tier_the_request_routes_to(stack: Stack, task: str | None, tier: str) -> None:
    from gateway import tokens

    headers = {**stack.auth, **({"x-gateway-task": task} if task else {})}
    text = "How many tokens is this?"
    r = httpx.post(f"{stack.gw.url}/tokenize", json={"model": "auto", "prompt": text}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-tier"] == tier
    rid = r.headers["x-gateway-request-id"]
    served, other = (stack.small, stack.frontier) if tier == "small" else (stack.frontier, stack.small)
    assert served.stats()["outcomes"][rid] == ["completed"] and rid not in other.stats()["outcomes"]
    got = r.json()
    assert got["tokens"] == tokens.encoding().encode_ordinary(text) and got["count"] == len(got["tokens"])
    rec = stack.ledger(rid)
    assert rec["endpoint"] == "tokenize" and rec["tier"] == tier and Decimal(rec["cost_usd"]) == 0
    back = httpx.post(f"{stack.gw.url}/detokenize", json={"tokens": got["tokens"]}, headers=headers)
    assert back.status_code == 200 and back.json() == {"prompt": text}
    assert back.headers["x-gateway-tier"] == tier
    assert Decimal(stack.ledger(back.headers["x-gateway-request-id"])["cost_usd"]) == 0


@pytest.mark.parametrize("path", ["/rerank", "/v1/score", "/tokenize", "/detokenize"])
def test_pooling_and_tokenizer_endpoints_need_a_key(stack: Stack, path: str) -> None:
    body = {"query": "q", "documents": ["d"], "text_1": "q", "text_2": "d", "prompt": "p", "tokens": [1]}
    r = httpx.post(f"{stack.gw.url}{path}", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["x-gateway-request-id"]


def test_rerank_reserves_input_tokens_only_and_is_rate_limited(stack: Stack) -> None:
    key = stack.new_key("small-tpm")  # tpm 100
    headers = {"authorization": f"Bearer {key}"}
    small = {"query": "q", "documents": ["one", "two"]}
    r = httpx.post(f"{stack.gw.url}/rerank", json=small, headers=headers)
    assert r.status_code == 200, r.text
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 100 - r.json()["usage"]["total_tokens"]
    big = {"query": "q", "documents": ["many words in every document " * 10] * 3}  # over 100 tokens
    r = httpx.post(f"{stack.gw.url}/rerank", json=big, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_over_limit"  # can never fit
    for _ in range(50):  # requests that fit, until the minute's 100 tokens are spent
        r = httpx.post(f"{stack.gw.url}/rerank", json=small, headers=headers)
        if r.status_code != 200:
            break
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/rerank", {"query": "q"}, "documents"),
        ("/rerank", {"query": ["a", "b"], "documents": ["x", "y", "z"]}, "query"),  # one query
        ("/score", {"queries": ["a", "b"], "documents": ["x", "y", "z"]}, "queries"),
        ("/score", {"queries": "q"}, "queries"),
        ("/tokenize", {"model": "auto"}, "prompt"),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
    ],
)
def test_bad_pooling_and_tokenizer_requests_are_400(stack: Stack, path: str, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{stack.gw.url}{path}", json=body, headers=stack.auth)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# --- cached prompt tokens -----------------------------------------------------------------------


def _cost(
    price_in: str, price_out: str, prompt: int, completion: int, cached: int = 0, price_cached: str = ""
) -> Decimal:
    billed_in = Decimal(price_in) * prompt
    if price_cached:
        billed_in = Decimal(price_in) * (prompt - cached) + Decimal(price_cached) * cached
    return (billed_in + Decimal(price_out) * completion) / 1_000_000


def test_cached_prompt_tokens_are_billed_at_the_tiers_cached_price(stack: Stack, sdk: Any) -> None:
    key = stack.new_key("cache-user")  # its own tenant, so the report below is only this test's
    client = sdk(f"{stack.gw.url}/v1", key)
    messages = [{"role": "user", "content": "a long shared system prompt " * 60}]
    ids, usages = [], []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model="small", messages=messages, max_tokens=3)
        ids.append(raw.headers["x-gateway-request-id"])
        usages.append(raw.parse().usage)
    with client.chat.completions.with_streaming_response.create(
        model="small", messages=messages, max_tokens=3, stream=True, stream_options={"include_usage": True}
    ) as raw:
        ids.append(raw.headers["x-gateway-request-id"])
        usages.append([c for c in raw.parse() if c.usage][-1].usage)
    prompt = usages[0].prompt_tokens
    assert usages[0].prompt_tokens_details is None  # the first time nothing is cached
    cached = (prompt - 1) // 128 * 128  # whole 128-token KV blocks, never the last token
    assert cached >= 256
    assert [u.prompt_tokens_details.cached_tokens for u in usages[1:]] == [cached, cached]  # plain and streamed
    records = [stack.ledger(rid) for rid in ids]
    assert [int(r["cached_tokens"]) for r in records] == [0, cached, cached]
    assert {r["price_cached_input"] for r in records} == {"0.025"}
    assert Decimal(records[0]["cost_usd"]) == _cost("0.10", "0.40", prompt, 3)
    for r in records[1:]:
        assert int(r["prompt_tokens"]) == prompt  # cached tokens are part of the prompt
        assert Decimal(r["cost_usd"]) == _cost("0.10", "0.40", prompt, 3, cached, "0.025")
    # the report prices the aggregates the same way, exactly
    import json

    from tests.procs import gateway_cli

    out = gateway_cli(stack.env, "ledger", "report", "--group-by", "tenant", "--format", "json", check=True).stdout
    [row] = [r for r in json.loads(out) if r["tenant"] == "cache-user"]
    assert Decimal(row["cost_usd"]) == sum((Decimal(r["cost_usd"]) for r in records), Decimal(0))
    assert row["cached_tokens"] == 2 * cached
    assert "ok" in gateway_cli(stack.env, "ledger", "verify", check=True).stdout.lower()


def test_cached_tokens_without_a_cached_price_are_billed_as_input(stack: Stack) -> None:
    body = {"model": "auto", "input": "another long prompt, for the frontier tier " * 40, "max_output_tokens": 2}
    rids, answers = [], []
    for _ in range(2):
        r = httpx.post(f"{stack.gw.url}/v1/responses", json=body, headers=stack.auth)
        assert r.status_code == 200 and r.headers["x-gateway-tier"] == "frontier"
        rids.append(r.headers["x-gateway-request-id"])
        answers.append(r.json()["usage"])
    cached = answers[1]["input_tokens_details"]["cached_tokens"]
    assert answers[0]["input_tokens_details"]["cached_tokens"] == 0 and cached > 0
    rec = stack.ledger(rids[1])
    assert int(rec["cached_tokens"]) == cached and rec["price_cached_input"] == ""  # recorded, not discounted
    assert Decimal(rec["cost_usd"]) == _cost("3.00", "15.00", answers[1]["input_tokens"], 2)
