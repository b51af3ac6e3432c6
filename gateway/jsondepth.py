"""Bounded JSON: a nesting limit for every JSON body the gateway reads, checked without slowing it.

``decode(raw, decoder)`` decodes with msgspec and refuses, with ``JsonTooDeep`` (a 400
``invalid_request_error``), any body nested more than ``MAX_DEPTH`` arrays and objects deep —
far above any real OpenAI request (a tool's JSON schema nested ten levels is ~30). Without it a
body nested ~1,000 deep made msgspec raise ``RecursionError``, which became a 500.

Why it costs nothing on the hot path: a body with at most ``MAX_DEPTH`` opening brackets cannot be
nested deeper, and counting them is two ``bytes.count`` calls (~1 µs for a 1 KB body). Only bodies
with more brackets get the exact measure, done with C-speed ``bytes`` operations rather than a
Python loop per byte (figures in docs/architecture.md). Deeper than msgspec itself can go (it
raises ``RecursionError``) is refused the same way.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from gateway.errors import JsonTooDeep

MAX_DEPTH = 128
_PASSES = 8  # innermost pairs removed before the exact run-length scan (kills wide, shallow shapes)

_STRUCTURAL = b'"[]{}'
_DROP = bytes(range(256)).translate(None, _STRUCTURAL)  # every byte but the structural ones
_SQUARE = bytes.maketrans(b"{}", b"[]")  # objects nest like arrays
_RUN = re.compile(rb"\[+|\]+")

T = TypeVar("T")


def _too_deep_error(limit: int) -> JsonTooDeep:
    return JsonTooDeep(
        f"The JSON body is nested too deeply: at most {limit} levels of arrays and objects are accepted."
    )


def depth(raw: bytes) -> int:
    """How deep arrays and objects nest in valid JSON ``raw`` (a scalar is 0, ``[]`` is 1)."""
    # Escaped backslashes, then escaped quotes, cannot end a string: blank them (same length is
    # the fast path of bytes.replace). What is left of strings is quotes around brackets.
    s = raw.replace(b"\\\\", b"  ").replace(b'\\"', b"  ").translate(_SQUARE, _DROP)
    s = b"".join(s.split(b'"')[::2])  # drop string contents: only the structure stays
    for removed in range(_PASSES):
        if not s:
            return removed
        s = s.replace(b"[]", b"")  # each pass removes every innermost pair: one level less
    deepest = level = 0
    for run in _RUN.finditer(s):
        n = run.end() - run.start()
        if s[run.start()] == 0x5B:  # "["
            level += n
            deepest = max(deepest, level)
        else:
            level -= n
    return deepest + _PASSES if s else _PASSES


def check(raw: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise ``JsonTooDeep`` if ``raw`` nests deeper than ``limit``."""
    if raw.count(b"[") + raw.count(b"{") > limit and depth(raw) > limit:
        raise _too_deep_error(limit)


def decode(raw: bytes, decoder: msgspec.json.Decoder[T], limit: int = MAX_DEPTH) -> T:
    """``decoder.decode(raw)`` with the nesting bound; msgspec's own errors pass through."""
    try:
        value = decoder.decode(raw)
    except RecursionError:
        raise _too_deep_error(limit) from None
    check(raw, limit)
    return value


_any = msgspec.json.Decoder()


def decode_any(raw: bytes, limit: int = MAX_DEPTH) -> Any:
    return decode(raw, _any, limit)
