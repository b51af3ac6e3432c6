"""The simulator against real vLLM captures (tests/fixtures/vllm-samples): same shapes, same errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Sim

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    s = Sim("tiny-small", tmp_path_factory.mktemp("sim"), "--max-model-len", "1024")
    yield s
    s.stop()


def keys(obj: object) -> object:
    """The shape of a JSON value: its keys, recursively, without the values."""
    if isinstance(obj, dict):
        return {k: keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [keys(obj[0])] if obj else []
    return None


def events(raw: str) -> list[dict[str, object]]:
    return [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]


def test_chat_and_completions_bodies_have_vllms_shape(sim: Sim, vllm_samples: Path) -> None:
    msg = [{"role": "user", "content": "hello"}]
    chat = httpx.post(f"{sim.url}/v1/chat/completions", json={"model": "tiny-small", "messages": msg}).json()
    assert keys(chat) == keys(json.loads((vllm_samples / "chat.json").read_text()))
    comp = httpx.post(f"{sim.url}/v1/completions", json={"model": "tiny-small", "prompt": "hi"}).json()
    assert keys(comp) == keys(json.loads((vllm_samples / "completions.json").read_text()))


@pytest.mark.parametrize(
    ("path", "body", "sample"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "chat-stream-with-usage.sse"),
        ("/v1/completions", {"prompt": "x"}, "completions-stream-with-usage.sse"),
    ],
)
def test_streams_have_vllms_shape(
    sim: Sim, vllm_samples: Path, path: str, body: dict[str, object], sample: str
) -> None:
    real = events((vllm_samples / sample).read_text())
    n = next(e["usage"]["completion_tokens"] for e in real if e.get("usage"))  # type: ignore[index]
    got_raw = httpx.post(
        f"{sim.url}{path}",
        json={
            "model": "tiny-small",
            **body,
            "stream": True,
            "max_tokens": n,
            "stream_options": {"include_usage": True},
        },
    ).text
    got = events(got_raw)
    assert got_raw.endswith("data: [DONE]\n\n")
    assert len(got) == len(real)
    assert [keys(e) for e in got] == [keys(e) for e in real]


def test_stream_without_usage_has_no_usage_chunk(sim: Sim, vllm_samples: Path) -> None:
    real = events((vllm_samples / "chat-stream-without-usage.sse").read_text())
    got = events(
        httpx.post(
            f"{sim.url}/v1/chat/completions",
            json={
                "model": "tiny-small",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
                "max_tokens": 5,
            },
        ).text
    )
    assert [keys(e) for e in got] == [keys(e) for e in real]


@pytest.mark.parametrize(
    ("body", "sample"),
    [
        (
            {"model": "tiny-small", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3000},
            "error-max-tokens-over-context.txt",
        ),
        ({"model": "no-such", "messages": [{"role": "user", "content": "x"}]}, "error-unknown-model.txt"),
    ],
)
def test_errors_match_vllm_exactly(sim: Sim, vllm_samples: Path, body: dict[str, object], sample: str) -> None:
    real_body, real_status = (vllm_samples / sample).read_text().strip().splitlines()
    r = httpx.post(f"{sim.url}/v1/chat/completions", json=body)
    assert r.status_code == int(real_status)
    assert r.json() == json.loads(real_body)


def test_malformed_json_is_vllms_400(sim: Sim, vllm_samples: Path) -> None:
    real = json.loads((vllm_samples / "error-malformed-json.txt").read_text().splitlines()[0])
    r = httpx.post(f"{sim.url}/v1/chat/completions", content=b'{"model": "tiny-small", "messages": [')
    assert r.status_code == 400
    assert keys(r.json()) == keys(real) and r.json()["error"]["code"] == 400


def test_models_health_and_metrics(sim: Sim, vllm_samples: Path) -> None:
    models = httpx.get(f"{sim.url}/v1/models").json()
    real = json.loads((vllm_samples / "models.json").read_text())
    assert set(models["data"][0]) == set(real["data"][0])
    assert models["data"][0]["id"] == "tiny-small" and models["data"][0]["max_model_len"] == 1024
    assert httpx.get(f"{sim.url}/health").status_code == 200
    metrics = httpx.get(f"{sim.url}/metrics").text
    for family in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ):
        assert f'{family}{{engine="0",model_name="tiny-small"}} ' in metrics


def test_usage_is_counted_with_a_real_tokenizer(sim: Sim) -> None:
    from gateway import tokens

    r = httpx.post(
        f"{sim.url}/v1/completions", json={"model": "tiny-small", "prompt": "The quick brown fox", "max_tokens": 7}
    ).json()
    assert r["usage"]["prompt_tokens"] == tokens.count_text("The quick brown fox") == 4
    assert r["usage"]["completion_tokens"] == 7 == tokens.count_text(r["choices"][0]["text"])


def sse_events(raw: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in raw.split("\n\n"):
        if block.strip():
            name, data = block.split("\n", 1)
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


@pytest.mark.parametrize(
    ("path", "body", "sample"),
    [
        ("/v1/responses", {"input": "x", "max_output_tokens": 6}, "responses.json"),
        ("/v1/messages", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 6}, "messages.json"),
        ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "x"}]}, "messages-count-tokens.json"),
    ],
)
def test_responses_and_messages_bodies_have_vllms_shape(
    sim: Sim, vllm_samples: Path, path: str, body: dict[str, object], sample: str
) -> None:
    got = httpx.post(f"{sim.url}{path}", json={"model": "tiny-small", **body}).json()
    assert keys(got) == keys(json.loads((vllm_samples / sample).read_text()))


@pytest.mark.parametrize(
    ("path", "body", "sample"),
    [
        ("/v1/responses", {"input": "x", "max_output_tokens": 2}, "responses-stream.sse"),
        ("/v1/messages", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}, "messages-stream.sse"),
    ],
)
def test_responses_and_messages_streams_have_vllms_shape(
    sim: Sim, vllm_samples: Path, path: str, body: dict[str, object], sample: str
) -> None:
    real = sse_events((vllm_samples / sample).read_text())
    got = sse_events(httpx.post(f"{sim.url}{path}", json={"model": "tiny-small", **body, "stream": True}).text)
    assert [(n, keys(d)) for n, d in got] == [(n, keys(d)) for n, d in real]


@pytest.mark.parametrize(("path", "sample"), [("/v1/responses", "responses"), ("/v1/messages", "messages")])
def test_unknown_model_errors_match_vllm(sim: Sim, vllm_samples: Path, path: str, sample: str) -> None:
    r = httpx.post(f"{sim.url}{path}", json={"model": "nope", "input": "x", "messages": []})
    assert r.status_code == 404
    assert r.json() == json.loads((vllm_samples / f"{sample}-error-unknown-model.json").read_text())


def test_tokenize_has_vllms_shape(sim: Sim, vllm_samples: Path) -> None:
    got = httpx.post(f"{sim.url}/tokenize", json={"model": "tiny-small", "prompt": "hello there"}).json()
    assert keys(got) == keys(json.loads((vllm_samples / "tokenize.json").read_text()))
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 1024
    back = httpx.post(f"{sim.url}/detokenize", json={"model": "tiny-small", "tokens": got["tokens"]}).json()
    assert back == {"prompt": "hello there"}


@pytest.mark.parametrize(
    ("path", "body", "sample"),
    [
        ("/v1/embeddings", {"input": ["the first document", "and a second one"]}, "embeddings.json"),
        ("/v1/embeddings", {"input": "hello there", "encoding_format": "base64"}, "embeddings-base64.json"),
        ("/v1/embeddings", {"input": [[5, 6, 7], [8, 9]]}, "embeddings-tokens.json"),
        ("/rerank", {"query": "France", "documents": ["Paris.", "Berlin.", "Bananas."], "top_n": 2}, "rerank.json"),
        ("/score", {"queries": "France", "documents": ["Paris.", "Bananas."]}, "score.json"),
        ("/v1/score", {"text_1": "France", "text_2": ["Paris.", "Bananas."]}, "score-text.json"),
    ],
)
def test_pooling_answers_have_vllms_shape(
    sim: Sim, vllm_samples: Path, path: str, body: dict[str, object], sample: str
) -> None:
    """Captured from vLLM's pooling runner (``--runner pooling --convert embed``) on the tiny model."""
    real = json.loads((vllm_samples / sample).read_text())
    r = httpx.post(f"{sim.url}{path}", json={"model": "tiny-small", **body})
    assert r.status_code == 200, r.text
    got = r.json()
    assert keys(got) == keys(real)
    assert len(got.get("data") or got.get("results")) == len(real.get("data") or real.get("results"))
    assert got["id"].split("-")[0] == real["id"].split("-")[0]  # embd-…, score-… (reranks too)
    if "data" in real and real.get("object") == "list" and "embedding" in real["data"][0]:
        kinds = {type(d["embedding"]) for d in got["data"]}
        assert kinds == {type(d["embedding"]) for d in real["data"]}  # floats, or a base64 string


@pytest.mark.parametrize(
    ("path", "body", "sample"),
    [
        ("/v1/embeddings", {"input": "x"}, "embeddings"),
        ("/rerank", {"query": "x", "documents": ["y"]}, "rerank"),
        ("/score", {"queries": "x", "documents": ["y"]}, "score"),
    ],
)
def test_pooling_unknown_model_errors_match_vllm(
    sim: Sim, vllm_samples: Path, path: str, body: dict[str, object], sample: str
) -> None:
    r = httpx.post(f"{sim.url}{path}", json={"model": "nope", **body})
    assert r.status_code == 404
    assert r.json() == json.loads((vllm_samples / f"{sample}-error-unknown-model.json").read_text())


def test_detokenize_matches_vllm(sim: Sim, vllm_samples: Path) -> None:
    tokens = httpx.post(f"{sim.url}/tokenize", json={"model": "tiny-small", "prompt": "hello there"}).json()["tokens"]
    back = httpx.post(f"{sim.url}/detokenize", json={"model": "tiny-small", "tokens": tokens}).json()
    assert back == json.loads((vllm_samples / "detokenize.json").read_text())  # {"prompt": "hello there"}


def test_rerank_and_score_agree_and_rank_best_first(sim: Sim) -> None:
    docs = ["Paris is in France.", "Bananas are yellow."]
    rerank = httpx.post(f"{sim.url}/rerank", json={"model": "tiny-small", "query": "France", "documents": docs}).json()
    scores = [r["relevance_score"] for r in rerank["results"]]
    assert scores == sorted(scores, reverse=True)  # best first
    score = httpx.post(f"{sim.url}/v1/score", json={"model": "tiny-small", "text_1": "France", "text_2": docs}).json()
    assert score["usage"]["prompt_tokens"] == score["usage"]["total_tokens"] == rerank["usage"]["total_tokens"]
    by_index = {r["index"]: r["relevance_score"] for r in rerank["results"]}
    assert [d["score"] for d in score["data"]] == [by_index[0], by_index[1]]  # the same pairs score the same
