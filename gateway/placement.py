"""Placement: which of a tier's available workers takes a request — the picking policy alone.

``least_load``: the lowest load (in flight here plus what the worker reports beyond it), ties
broken in turn — a scan the pool runs inline, since it is every request's path. ``prefix``:
requests whose prompts start alike go to the same worker, so vLLM's
automatic prefix cache serves the shared blocks. The key is computed from the request alone and
ranked over the workers by rendezvous hashing, so every gateway replica picks the same worker with
no shared index, and a worker that leaves moves only the prefixes it held (a worker that joins
takes only the ones it now ranks first for). The choice is bounded by load: a worker whose load
would pass ``ceil((1 + EPSILON) * mean)`` is skipped for the next in the prefix's ranking
(rendezvous with a load cap — consistent hashing with bounded loads, Mirrokni et al. 2018).

The key hashes the leading bytes of the prompt text, not token ids. The gateway's tiktoken count
uses cl100k, not the worker's tokenizer, so its ids would not line up with the engine's blocks
anyway, and tokenizing only for a key would cost more than the hash. A KV block is 128 tokens on
vLLM's CPU build (``cache_config_info``'s ``block_size``); at ~4 bytes of English per token the
first block is ~512 bytes. Prompts shorter than that fill no block — vLLM caches only whole blocks —
so they carry no key and are placed by load. Hashing exactly the first block's worth groups every
request that shares a system prompt or a document opening, which is where the reuse is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

ENGINE_BLOCK_TOKENS = 128  # vLLM's KV block on the CPU build (shared/vllm-samples/metrics-prefix-excerpt.txt)
BYTES_PER_TOKEN = 4  # English text in BPE vocabularies, roughly
PREFIX_BYTES = ENGINE_BLOCK_TOKENS * BYTES_PER_TOKEN
EPSILON = 0.25  # a prefix's worker may carry up to 25% more than the tier's mean before it spills over


class Candidate(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def load(self) -> float: ...


C = TypeVar("C", bound=Candidate)


def prefix_key(texts: Sequence[str], size: int = PREFIX_BYTES) -> bytes | None:
    """The first ``size`` bytes of the prompt's text, pieces joined in order (a chat's messages,
    a completion's prompt), hashed; None when the prompt is shorter (no whole block to reuse)."""
    head = bytearray()
    for text in texts:
        head += text.encode()[: size - len(head)]
        head += b"\x00"  # message boundaries count: "ab"+"c" is not "a"+"bc"
        if len(head) >= size:
            return hashlib.blake2b(bytes(head[:size]), digest_size=16).digest()
    return None


def score(key: bytes, url: str) -> int:
    """The rendezvous weight of ``url`` for ``key``: the highest wins."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8, key=key[:64]).digest(), "big")


def load_cap(loads: Sequence[float], epsilon: float = EPSILON) -> float:
    """The most a worker may carry, counting the request being placed, under bounded loads."""
    return math.ceil((1 + epsilon) * (sum(loads) + 1) / len(loads))


def by_prefix(key: bytes, candidates: Sequence[C], epsilon: float = EPSILON) -> C:
    """The highest-ranked candidate for ``key`` whose load stays within the cap (one always does:
    not every worker can be above the mean)."""
    cap = load_cap([c.load for c in candidates], epsilon)
    ranked = sorted(candidates, key=lambda c: score(key, c.url), reverse=True)
    for c in ranked:
        if c.load + 1 <= cap:
            return c
    return min(ranked, key=lambda c: c.load)


def by_session(session: str, candidates: Sequence[C]) -> C:
    """Header affinity: the session's rendezvous winner, whatever its load."""
    return max(candidates, key=lambda c: _session_weight(session, c.url))


def _session_weight(session: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{session}\0{url}".encode(), digest_size=8).digest(), "big")
