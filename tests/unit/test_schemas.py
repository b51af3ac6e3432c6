"""The parse stage: malformed input is a clear 400; known fields are read, unknown ones kept."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gateway.errors import InvalidRequest
from gateway.schemas import Endpoint, decode_request, read_usage, upstream_body

CHAT = Endpoint.CHAT


@pytest.mark.parametrize(
    ("raw", "message", "param"),
    [
        (b'{"model": "auto", "messages": [', "The request body is not valid JSON", None),
        (b"[1, 2]", "The request body must be a JSON object.", None),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "Missing required parameter: 'model'.", "model"),
        (b'{"model": "auto"}', "Missing required parameter: 'messages'.", "messages"),
        (b'{"model": "auto", "messages": []}', "Invalid value for 'messages'", "messages"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "Invalid value for 'model'", "model"),
        (b'{"model": "auto", "messages": [{"content": "x"}]}', "Missing required parameter: 'role'.", "role"),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}',
            "Invalid value for 'max_tokens'",
            "max_tokens",
        ),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            "Invalid value for 'max_tokens'",
            "max_tokens",
        ),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            "Invalid value for 'stream'",
            "stream",
        ),
        (b'{"model": "", "messages": [{"role": "user", "content": "x"}]}', "must not be empty", "model"),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
            "Invalid value for 'temperature': the number is out of range (JSON numbers must fit a 64-bit float).",
            "temperature",
        ),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 0}', "Invalid value for 'n'", "n"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 1.5}', "Invalid value for 'n'", "n"),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "best_of": "3"}',
            "Invalid value for 'best_of'",
            "best_of",
        ),
    ],
)
def test_malformed_chat_requests_are_400(raw: bytes, message: str, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(CHAT, raw)
    assert message in info.value.message
    assert info.value.param == param
    assert info.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "auto"}',
        b'{"model": "auto", "prompt": [1, "a"]}',
        b'{"model": "auto", "prompt": {"a": 1}}',
    ],
)
def test_malformed_completion_requests_are_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        decode_request(Endpoint.COMPLETIONS, raw)


def test_chat_fields_are_read() -> None:
    parsed = decode_request(
        CHAT,
        b'{"model": "small", "messages": [{"role": "system", "content": "Be brief."},'
        b' {"role": "user", "name": "ann",'
        b' "content": [{"type": "text", "text": "Sort "}, {"type": "text", "text": "this"}]}],'
        b' "max_completion_tokens": 20, "max_tokens": 99, "stream": true,'
        b' "stream_options": {"include_usage": true}, "metadata": {"task": "classification"}, "top_k": 5}',
    )
    assert parsed.model == "small"
    assert parsed.max_tokens == 20  # max_completion_tokens wins, as in OpenAI's API
    assert parsed.stream
    assert parsed.client_wants_usage
    assert parsed.task == "classification"
    assert parsed.last_user_text == "Sort this"
    assert parsed.messages == 2
    assert parsed.names == 1
    assert parsed.body["top_k"] == 5


@pytest.mark.parametrize(
    ("extra", "completions"),
    [(b"", 1), (b', "n": null', 1), (b', "n": 4', 4), (b', "best_of": 5, "n": 2', 5), (b', "n": 3, "best_of": 1', 3)],
)
def test_completions_counts_n_and_best_of(extra: bytes, completions: int) -> None:
    raw = b'{"model": "auto", "prompt": "hi"' + extra + b"}"
    assert decode_request(Endpoint.COMPLETIONS, raw).completions == completions


def test_completion_prompts_of_every_shape() -> None:
    assert decode_request(Endpoint.COMPLETIONS, b'{"model": "a", "prompt": "hi"}').texts == ("hi",)
    assert decode_request(Endpoint.COMPLETIONS, b'{"model": "a", "prompt": ["x", "y"]}').texts == ("x", "y")
    assert decode_request(Endpoint.COMPLETIONS, b'{"model": "a", "prompt": [1, 2, 3]}').prompt_token_ids == 3
    assert decode_request(Endpoint.COMPLETIONS, b'{"model": "a", "prompt": [[1, 2], [3]]}').prompt_token_ids == 3


def test_upstream_body_rewrites_model_and_always_asks_usage_on_streams() -> None:
    raw = (
        b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": true,'
        b' "stream_options": {"include_usage": false, "continuous_usage_stats": false},'
        b' "top_k": 3, "guided_json": {"type": "object"}, "metadata": {"task": "t"}}'
    )
    body = msgspec.json.decode(upstream_body(decode_request(CHAT, raw), "tiny-small"))
    assert body["model"] == "tiny-small"
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert body["top_k"] == 3
    assert body["guided_json"] == {"type": "object"}
    assert body["metadata"] == {"task": "t"}


def test_upstream_body_leaves_non_streams_without_stream_options() -> None:
    # vLLM refuses stream_options on a non-streaming request.
    raw = b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": 0.5}'
    body = msgspec.json.decode(upstream_body(decode_request(CHAT, raw), "m"))
    assert body == {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.5}


def test_read_usage_from_vllm_samples(vllm_samples: Path) -> None:
    usage = read_usage((vllm_samples / "chat.json").read_bytes())
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (41, 8)
    assert read_usage(b'{"choices": []}') is None
    assert read_usage(b"not json") is None


def test_usage_a_worker_cannot_make_believable_is_read_as_missing() -> None:
    from gateway.schemas import read_usage

    assert read_usage(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 7}}') is not None
    for bad in (
        b'{"usage": {"prompt_tokens": -1000000, "completion_tokens": -1000000}}',
        b'{"usage": {"prompt_tokens": 5, "completion_tokens": 100000000000000000000000}}',
        b'{"usage": {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": -3}}}',
    ):
        assert read_usage(bad) is None, bad
