"""Bounded JSON: the depth measure is exact, the bound is a 400, and the common case costs ~nothing."""

from __future__ import annotations

import json
import timeit
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import jsondepth
from gateway.errors import JsonTooDeep
from gateway.schemas import Endpoint, decode_request

# strings full of what could fool a byte scan: brackets, quotes, backslashes
tricky = st.text(alphabet='[]{}"\\ \n\tx', max_size=8)
values = st.recursive(
    st.none() | st.integers() | tricky,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky, inner, max_size=4),
    max_leaves=60,
)


def nesting(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


@settings(max_examples=400, deadline=None)
@given(values)
def test_depth_is_exact(value: Any) -> None:
    raw = json.dumps(value).encode()
    assert jsondepth.depth(raw) == nesting(value)


@pytest.mark.parametrize("depth", [127, 128, 129, 1_000, 10_000, 200_000])
def test_the_bound_is_exact_and_deep_bodies_are_a_400(depth: int) -> None:
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    raw = b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "x": ' + inner.encode() + b"}"
    if depth <= jsondepth.MAX_DEPTH:
        decode_request(Endpoint.CHAT, raw)
        return
    with pytest.raises(JsonTooDeep) as info:
        decode_request(Endpoint.CHAT, raw)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    assert info.value.code == "json_too_deep"


def test_many_brackets_inside_strings_are_not_nesting() -> None:
    body = {"model": "auto", "prompt": "[[[{{{" * 10_000 + '\\"]]]' * 1000}
    decode_request(Endpoint.COMPLETIONS, msgspec.json.encode(body))


def test_wide_bodies_with_many_arrays_pass() -> None:
    body = {"model": "auto", "prompt": [[1, 2, 3]] * 5_000}  # 5,000 token-id prompts
    assert decode_request(Endpoint.COMPLETIONS, msgspec.json.encode(body)).prompt_token_ids == 15_000


def test_the_check_is_about_a_microsecond_on_an_ordinary_body() -> None:
    raw = msgspec.json.encode({"model": "auto", "messages": [{"role": "user", "content": "hello " * 150}] * 3})
    seconds = min(timeit.repeat(lambda: jsondepth.check(raw), number=2_000, repeat=3)) / 2_000
    assert seconds < 20e-6  # ~1 µs measured; generous for a loaded CI machine
