"""The relay stage for streams: pass a worker's SSE events to the client as they come.

The gateway always asks the worker for usage; the relay reads the final usage chunk (an event
whose ``choices`` is an empty list and which has ``usage`` — recognized by what it means, not by
how a worker spaces its JSON) and forwards it only if the client asked for it. Only events that
contain ``"usage"`` are decoded, so the relay stays a byte copy for the others. Between events
the worker has ``idle`` seconds, counted from when the last event with data was relayed — bytes
that make no event (blank lines, a body dripped a byte at a time) do not keep a stream open. A
worker that stalls or drops the connection mid-stream ends the client's stream with an
OpenAI-shaped ``error`` event (nothing can be retried once bytes flowed).
So does a worker whose unfinished event grows past ``MAX_EVENT_BYTES``: no real event is that
large, and buffering it would let one worker take the gateway's memory.

What was relayed is kept only as far as billing needs it (``relayed_text``, for a stream that
ended without the worker's usage): every ``COMPACT_BYTES`` of relayed SSE are reduced to their
generated text, so a long stream holds its text (about a fiftieth of vLLM's SSE) and at most
``COMPACT_BYTES`` of raw events. The per-chunk path stays a byte copy: events are decoded for
their text in batches, once per ``COMPACT_BYTES``.

``close`` runs exactly once however the stream ends — finished, failed, or the client gone — and
hands the outcome to ``on_close``; that is where the upstream connection is closed so the worker
stops generating.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec

from gateway.dispatch import Upstream
from gateway.errors import render
from gateway.schemas import Endpoint, InputOutputUsage, ReportedTokens, UsageOnly

DONE = b"data: [DONE]"
MAX_EVENT_BYTES = 1 << 20  # an unfinished event larger than this: the worker is failing
COMPACT_BYTES = 256 << 10  # relayed SSE kept raw before it is reduced to its text


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []


_chunk_decoder = msgspec.json.Decoder(_Chunk)


class _UsageChunk(msgspec.Struct):
    choices: list[msgspec.Raw] | None = None
    usage: UsageOnly | None = None


_usage_chunk_decoder = msgspec.json.Decoder(_UsageChunk)


class _ResponseState(msgspec.Struct):
    id: str | None = None
    usage: InputOutputUsage | None = None


class _ResponseEvent(msgspec.Struct):
    """A Responses stream event: the final one (``response.completed``) has ``response.usage``."""

    response: _ResponseState | None = None


class _MessageStart(msgspec.Struct):
    usage: InputOutputUsage | None = None


class _MessageDeltaUsage(msgspec.Struct):
    input_tokens: ReportedTokens | None = None
    output_tokens: ReportedTokens = 0


class _MessageEvent(msgspec.Struct):
    """An Anthropic Messages stream event: ``message_start`` has ``message.usage.input_tokens``,
    ``message_delta`` has ``usage.output_tokens`` (and vLLM repeats the input there)."""

    type: str = ""
    message: _MessageStart | None = None
    usage: _MessageDeltaUsage | None = None


class _TextEvent(msgspec.Struct):
    delta: str | dict[str, Any] | None = None


_text_event_decoder = msgspec.json.Decoder(_TextEvent)
_response_event_decoder = msgspec.json.Decoder(_ResponseEvent)
_message_event_decoder = msgspec.json.Decoder(_MessageEvent)

# The bytes that end a stream, per endpoint: once the client has them and usage is known, the
# stream is complete even if the client hangs up before the worker closes.
_DONE = {
    Endpoint.CHAT: DONE,
    Endpoint.COMPLETIONS: DONE,
    Endpoint.RESPONSES: b"event: response.completed",
    Endpoint.MESSAGES: b"event: message_stop",
}


def stream_error(endpoint: Endpoint, message: str, code: str = "worker_stream_error") -> bytes:
    """The event that ends a client's stream early (the worker failed mid-way, the gateway shut
    down), in the endpoint's dialect."""
    if endpoint is Endpoint.MESSAGES:
        body = _encode({"type": "error", "error": {"type": "api_error", "message": message}})
        return b"event: error\ndata: " + body + b"\n\n"
    if endpoint is Endpoint.RESPONSES:
        error = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + _encode(error) + b"\n\n"
    return b"data: " + render(message, "api_error", None, code) + b"\n\n"


_encode = msgspec.json.Encoder().encode
_DATA_OBJECT = re.compile(rb"^data: ?(\{.*)$", re.MULTILINE)  # found in C: half the cost of splitting events


def event_data(event: bytes) -> bytes | None:
    """The payload of an SSE event's ``data:`` line (the first, at the start or after ``event:``)."""
    if event.startswith(b"data:"):
        start = 5
    else:
        start = event.find(b"\ndata:")
        if start < 0:
            return None
        start += 6
    end = event.find(b"\n", start)
    data = event[start:] if end < 0 else event[start:end]
    return data[1:] if data.startswith(b" ") else data


class Outcome(enum.Enum):
    """How a request ended, as the ledger, the log and the metrics record it."""

    OK = "ok"
    ERROR = "error"  # refused, or answered with an error
    PARTIAL = "partial"  # the worker failed mid-stream
    TIMEOUT = "timeout"  # the worker took longer than a time-out (first byte, idle): the gateway gave up
    CLIENT_DISCONNECT = "client_disconnect"  # the client left before the end
    SHUTDOWN = "shutdown"  # the gateway stopped (grace period over) before the end


class StreamRelay:
    """An async iterator of bytes for the client; also the stream's one close callback."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        endpoint: Endpoint = Endpoint.CHAT,
        client_wants_usage: bool,
        idle_timeout: float,
        on_close: Callable[[StreamRelay], Awaitable[None]],
    ):
        self.upstream = upstream
        self.endpoint = endpoint
        self.done_marker = _DONE.get(endpoint, DONE)
        self.response_id: str | None = None  # a Responses stream's id, from its final event
        self._input_tokens: int | None = None  # a Messages stream's, from message_start
        self.client_wants_usage = client_wants_usage
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.usage: UsageOnly | None = None
        self.outcome = Outcome.CLIENT_DISCONNECT  # until the stream is seen to end otherwise
        # what the client was sent, to bill a stream that ends without usage: the text of what was
        # compacted, and the events sent since
        self._text: list[str] = []
        self._sent: list[bytes] = []
        self._sent_bytes = 0
        self._tail: list[bytes] = []  # the pieces of an unfinished event (joined once it ends)
        self._tail_bytes = 0
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._relay()

    async def _relay(self) -> AsyncIterator[bytes]:
        chunks = self.upstream.chunks
        assert chunks is not None
        chunk = self.upstream.first_chunk
        loop = asyncio.get_running_loop()
        idle = self.idle_timeout
        deadline = loop.time() + idle
        while True:
            out = self._events(chunk)
            if out:
                self._keep(out)
                yield out
                self._check_done(out)
            if self._tail_bytes > MAX_EVENT_BYTES:
                self._tail.clear()
                self.outcome = Outcome.PARTIAL
                yield stream_error(self.endpoint, f"The worker sent an event larger than {MAX_EVENT_BYTES} bytes.")
                return
            try:
                # one timer per read, as before; the deadline moves only when an event went out, and
                # a read that made none is held to it here (data already buffered never suspends
                # the read, so its timer alone would not fire)
                if out and b"data:" in out:
                    deadline = loop.time() + idle
                elif loop.time() >= deadline:
                    raise TimeoutError
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks, b"")
            except (TimeoutError, httpx.HTTPError, OSError) as exc:
                self.outcome = Outcome.TIMEOUT if isinstance(exc, TimeoutError) else Outcome.PARTIAL
                yield stream_error(self.endpoint, "The worker stopped responding mid-stream.")
                return
            if not chunk:
                break
        if self._tail:
            rest = b"".join(self._tail)
            if rest.strip():
                self._keep(rest)
                yield rest
        self.outcome = Outcome.OK if self.usage is not None else Outcome.PARTIAL

    def _keep(self, out: bytes) -> None:
        self._sent.append(out)
        self._sent_bytes += len(out)
        if self._sent_bytes >= COMPACT_BYTES:
            self._text.append(self._text_of(b"".join(self._sent)))
            self._sent.clear()
            self._sent_bytes = 0

    def _check_done(self, sent: bytes) -> None:
        """The client has been sent ``[DONE]`` (and the worker's usage was seen): the stream is
        complete for it, even if it hangs up before the worker closes the connection (the openai
        SDK does exactly that)."""
        if self.usage is not None and self.done_marker in sent:
            self.outcome = Outcome.OK

    def _events(self, chunk: bytes) -> bytes:
        """Complete events of ``chunk`` to forward; an unfinished tail waits, as pieces joined only
        once its end arrives (no copying per piece)."""
        tail = self._tail
        if tail:
            # the end of the event may also straddle the two pieces
            if b"\n\n" not in chunk and not (chunk[:1] == b"\n" and tail[-1][-1:] == b"\n"):
                self._hold(chunk)
                return b""
            tail.append(chunk)
            data = b"".join(tail)
            tail.clear()
            self._tail_bytes = 0
        else:
            data = chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._hold(data)
            return b""
        if end + 2 < len(data):
            self._hold(data[end + 2 :])
        complete = data[: end + 2]
        if b'"usage"' not in complete:
            return complete
        kept = []
        for event in complete.split(b"\n\n"):
            if not event:
                continue
            if b'"usage"' in event and self.endpoint is not Endpoint.CHAT and self.endpoint is not Endpoint.COMPLETIONS:
                self._read_event_usage(event)
            elif b'"usage"' in event:
                payload = event_data(event)
                try:
                    parsed = _usage_chunk_decoder.decode(payload) if payload else None
                except (msgspec.DecodeError, msgspec.ValidationError):
                    parsed = None
                if parsed is not None and parsed.usage is not None:
                    self.usage = parsed.usage
                    if not self.client_wants_usage and parsed.choices == []:
                        continue  # the final usage chunk, which the client did not ask for
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def _hold(self, piece: bytes) -> None:
        self._tail.append(piece)
        self._tail_bytes += len(piece)

    def _read_event_usage(self, event: bytes) -> None:
        """Usage from a Responses or Messages event; those streams always carry it, and it is the
        client's to read, so nothing is hidden."""
        payload = event_data(event)
        if not payload:
            return
        try:
            if self.endpoint is Endpoint.RESPONSES:
                state = _response_event_decoder.decode(payload).response
                if state is not None and state.usage is not None:
                    self.usage, self.response_id = state.usage.usage(), state.id
                return
            message = _message_event_decoder.decode(payload)
            if message.message is not None and message.message.usage is not None:
                self._input_tokens = message.message.usage.input_tokens
            elif message.type == "message_delta" and message.usage is not None:
                delta = message.usage
                prompt = delta.input_tokens if delta.input_tokens is not None else self._input_tokens
                self.usage = UsageOnly(prompt or 0, delta.output_tokens)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return

    def relayed_text(self) -> str:
        """The generated text the client received (chat deltas, completion text, Responses'
        ``output_text.delta``, Messages' ``text_delta``), for billing a stream that ended without
        the worker's usage."""
        return "".join([*self._text, self._text_of(b"".join(self._sent))])

    def _text_of(self, sent: bytes) -> str:
        """The generated text in ``sent`` (whole events): of every ``data:`` line holding a JSON object."""
        parts: list[str] = []
        openai = self.endpoint is Endpoint.CHAT or self.endpoint is Endpoint.COMPLETIONS
        for payload in _DATA_OBJECT.findall(sent):
            try:
                if openai:
                    for choice in _chunk_decoder.decode(payload).choices:
                        text = choice.delta.content if choice.delta is not None else choice.text
                        if text:
                            parts.append(text)
                    continue
                delta = _text_event_decoder.decode(payload).delta
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(delta, str):
                parts.append(delta)
            elif isinstance(delta, dict) and isinstance(delta.get("text"), str):
                parts.append(delta["text"])
        return "".join(parts)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.upstream.close()
        finally:
            await self.on_close(self)
