"""The serving port's edge: uvicorn's httptools protocol, with bounds on what one client can make
the gateway hold before a request reaches the application.

- **Head size.** The request line and headers may total ``max_header_bytes`` and number
  ``max_headers``; above either, the answer is 431 in OpenAI's error shape, sent as soon as the
  limit is passed — while the head is still arriving. A 100 MB header therefore costs one or two
  read buffers (uvloop reads at most 256 KiB at a time), never 100 MB: httptools keeps a header's
  value to itself until the header ends, so besides counting what its callbacks report, every read
  that falls wholly inside one head is counted as it arrives.
- **Head and body deadlines.** The head must arrive within ``head_timeout_s`` of connecting, or
  of the first byte of the next request on a kept-alive connection; the body within
  ``body_timeout_s`` of the end of the head. A slower client is disconnected (with a 408 when the
  connection has nothing else in flight) and counted in ``gateway_slow_clients_closed_total``.
  A request that arrives in one read costs no timer at all: deadlines are armed only when a read
  leaves a head or a body unfinished.
- **Idle keep-alive** connections are closed by uvicorn's own ``timeout_keep_alive``.
- **One write per answer.** uvicorn writes a response's head and its body separately; ``EdgeCycle``
  holds the head (``HeadFirst``) until the first body bytes, or the end of that loop turn, and
  writes both with one ``write``.

Everything else — parsing, the ASGI cycle, pipelining, flow control — is uvicorn's. After a 431
the connection is closed the way RFC 9112 §9.6 advises: the answer is sent, the sending side shut,
and whatever the client still sends is read and dropped for up to ``LINGER_S``; closing at once
would reset the connection, and a reset can destroy the answer before the client reads it.

``protocol(settings)`` gives what ``uvicorn.run(http=...)`` takes: a partial of ``EdgeProtocol``,
picklable, so ``gateway serve --workers N`` hands it to every process.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Callable
from typing import Any

import httptools
import msgspec
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway.errors import render
from gateway.metrics import HEADS_REFUSED, SLOW_CLIENTS
from gateway.settings import Settings

LINGER_S = 2.0  # after a 431: how long what the client still sends is read and dropped


class EdgeLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_header_bytes: int
    max_headers: int
    head_timeout_s: float
    body_timeout_s: float


class Phase(enum.Enum):
    IDLE = "idle"  # between requests (or the application is answering one)
    HEAD = "head"  # a request's head is arriving
    BODY = "body"  # its body is arriving


class _HeadRefused(Exception):
    """Raised from a parser callback to stop httptools; the reason is on the protocol."""


def protocol(settings: Settings) -> Callable[..., EdgeProtocol]:
    limits = EdgeLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        head_timeout_s=settings.head_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    return functools.partial(EdgeProtocol, limits=limits)


class EdgeProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: EdgeLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._phase = Phase.IDLE
        self._messages = 0  # requests begun on this connection
        self._head_size = 0  # request target + completed headers of the current head
        self._head_read = 0  # bytes of reads that fell wholly inside the current head
        self._header_count = 0
        self._refusal: str | None = None  # why the current head is refused: "bytes" or "count"
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False

    # deadlines

    def _arm(self, seconds: float, phase: Phase) -> None:
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: Phase) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        SLOW_CLIENTS.labels(phase.value).inc()
        # the head deadline also runs on a fresh connection that has sent nothing yet (phase IDLE)
        busy = self.cycle is not None and not self.cycle.response_complete
        if phase is Phase.HEAD and self._phase is Phase.HEAD and not busy:
            limit = self.limits.head_timeout_s
            self._write_error(408, "request_timeout", f"The request head did not arrive within {limit:g} s.")
        # in the body phase the application is waiting for the body: closing ends its wait
        self.transport.close()

    # the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.head_timeout_s, Phase.HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # after a 431: read and dropped
        self._unset_keepalive_if_required()
        messages = self._messages
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse()
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._phase is Phase.HEAD and messages == self._messages:  # the whole read belongs to this head
            self._head_read += len(data)
            if self._head_read > self.limits.max_header_bytes:
                self._refusal = "bytes"
                self._refuse()
                return
        # Not while pipelined requests wait: uvicorn stops reading then, so the client is not the slow one.
        if self._deadline is None and not self.pipeline:
            if self._phase is Phase.HEAD:
                self._arm(self.limits.head_timeout_s, Phase.HEAD)
            elif self._phase is Phase.BODY:
                self._arm(self.limits.body_timeout_s, Phase.BODY)

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = Phase.HEAD
        self._messages += 1
        self._head_size = self._head_read = self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.limits.max_header_bytes:
            self._refusal = "bytes"
            raise _HeadRefused
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4  # "name: value\r\n"
        if self._header_count > self.limits.max_headers:
            self._refusal = "count"
            raise _HeadRefused
        if self._head_size > self.limits.max_header_bytes:
            self._refusal = "bytes"
            raise _HeadRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._phase = Phase.BODY
        self._disarm()
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not before and cycle is not None:  # uvicorn made this request's cycle
            cycle.__class__ = EdgeCycle
            cycle.transport = cycle.out = HeadFirst(cycle.transport)  # type: ignore[attr-defined,assignment]
            cycle.loop = self.loop  # type: ignore[attr-defined]

    def on_message_complete(self) -> None:
        self._phase = Phase.IDLE
        self._disarm()
        super().on_message_complete()

    # refusing

    def _refuse(self) -> None:
        """Answer 431, shut the sending side, and drop what still comes for up to ``LINGER_S``."""
        reason = self._refusal or "bytes"
        HEADS_REFUSED.labels(reason).inc()
        self._disarm()
        self._lingering = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined head: the answer in flight must not be interleaved
            return
        if reason == "count":
            message = f"The request has more than {self.limits.max_headers} header fields."
        else:
            message = f"The request's header fields total more than {self.limits.max_header_bytes} bytes."
        self._write_error(431, "request_header_fields_too_large", message)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._deadline = self.loop.call_later(LINGER_S, self.transport.close)

    def _write_error(self, status: int, code: str, message: str) -> None:
        body = render(message, "invalid_request_error", None, code)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)]
        self.transport.write(b"".join(head) + body)


class HeadFirst:
    """A request cycle's view of the connection: the response head is held back and written
    together with the first body bytes, so a complete answer is one ``write`` (one syscall), not two.
    It waits at most until the end of the event loop's turn (a stream whose first event is not
    ready yet still gets its head at once)."""

    __slots__ = ("head", "holding", "transport")

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.head: bytes | None = None
        self.holding = False

    def write(self, data: bytes) -> None:
        if self.holding:
            self.head = data
            return
        head = self.head
        if head is not None:
            self.head = None
            data = head + data
        self.transport.write(data)

    def flush(self) -> None:
        head, self.head = self.head, None
        if head is not None and not self.transport.is_closing():
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class EdgeCycle(RequestResponseCycle):
    """uvicorn's request cycle, its writes going through ``HeadFirst``: everything uvicorn checks
    and adds to a response stays uvicorn's; only the head waits for the body's first write."""

    out: HeadFirst
    loop: asyncio.AbstractEventLoop

    async def send(self, message: Any) -> None:
        out = self.out
        if message["type"] == "http.response.start" and not self.response_started:
            out.holding = True
            try:
                await super().send(message)
            finally:
                out.holding = False
            if out.head is not None:  # a body sent later than this turn of the loop does not hold it up
                self.loop.call_soon(out.flush)
            return
        await super().send(message)
        if out.head is not None:  # nothing was written with it (a HEAD request, a client gone)
            out.flush()
