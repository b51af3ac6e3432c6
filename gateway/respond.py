"""Answers of the governed endpoints, sent as raw ASGI messages.

The pipeline's endpoints skip Litestar's request and response objects (their header multidicts,
``ASGIResponse`` and the streaming response's task group cost about a tenth of the CPU of a
request): ``Plain`` is a complete body, sent as one ``http.response.start`` and one body message
(which the edge writes to the socket together, ``edge.EdgeCycle``); ``Relayed`` is a stream,
relayed chunk by chunk. Both send the same headers Litestar's responses did: the content type
(``; charset=utf-8`` on ``text/`` types), ``content-length`` for a complete body, and the given ones.

A stream notices its client leaving with ``DisconnectWatch`` — a timer, and a task waiting on
``receive()`` only once the stream has lasted ``AFTER_S`` — rather than a task per stream: most
answers end sooner. Whatever ends it (done, failed, the client gone, shutdown), the relay is closed
exactly once, shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import anyio
from litestar.types import HTTPResponseBodyEvent, Receive, Send

from gateway.errors import ShuttingDown
from gateway.streaming import Outcome, StreamRelay, stream_error

JSON = "application/json"
SSE = b"text/event-stream; charset=utf-8"
LAST_SEND_S = 0.5  # the last bytes to a client cut by shutdown: one that does not read them is not waited for
SHUTDOWN_MESSAGE = "The gateway is shutting down; please retry the request."
_END: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}


def raw_headers(content_type: bytes, headers: Mapping[str, str], length: int | None) -> list[tuple[bytes, bytes]]:
    out = [(b"content-type", content_type)]
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    for name, value in headers.items():
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    return out


def media(content_type: str) -> bytes:
    return (content_type + "; charset=utf-8" if content_type.startswith("text/") else content_type).encode("latin-1")


def cut_by_shutdown(exc: asyncio.CancelledError) -> bool:
    """uvicorn cancels the requests still running when the shutdown grace period is over, with a
    message saying so ("Task cancelled, timeout graceful shutdown exceeded")."""
    return "shutdown" in str(exc)


def absorb_cancel() -> None:
    """The request task handled its cancellation (its client got an answer): it ends normally, so
    uvicorn logs no traceback and sends no bare 500 of its own."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


class Plain:
    """A complete answer."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str]):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers

    async def send(self, send: Send, receive: Receive) -> None:
        head = raw_headers(media(self.content_type), self.headers, len(self.body))
        await send({"type": "http.response.start", "status": self.status, "headers": head})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


class DisconnectWatch:
    """While the worker works and the client waits, notice the client leaving: then the waiting
    task is cancelled, which closes the worker's connection (the worker aborts the generation).
    The body has been read, so the next ASGI message can only be ``http.disconnect``. The watching
    task starts only once the wait has lasted ``AFTER_S``: most answers come sooner, and a timer is
    several times cheaper than a task (a departure is then noticed within ``AFTER_S``, not at once)."""

    AFTER_S = 0.05
    __slots__ = ("gone", "receive", "task", "timer", "watcher")

    def __init__(self, receive: Receive, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object] | None):
        self.gone = False
        self.receive = receive
        self.task = task
        self.watcher: asyncio.Task[None] | None = None
        self.timer = loop.call_later(self.AFTER_S, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        message = await self.receive()
        if message["type"] == "http.disconnect" and self.task is not None:
            self.gone = True
            self.task.cancel()

    def stop(self) -> None:
        """Stop watching; if the client left just as the answer came, absorb the cancel it sent."""
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
        if self.gone and self.task is not None and self.task.cancelling():
            self.task.uncancel()


class Relayed:
    """A stream: the relay's chunks as they come. A stream still running when the shutdown grace
    period is over ends with an error event in its dialect (code ``shutting_down``) and a proper end
    of body, rather than a connection cut mid-body."""

    __slots__ = ("completed", "headers", "relay")

    def __init__(self, relay: StreamRelay, headers: Mapping[str, str]):
        self.relay = relay
        self.headers = headers
        self.completed = False  # the body's last message went out

    async def send(self, send: Send, receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        watch = DisconnectWatch(receive, loop, asyncio.current_task(loop))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers(SSE, self.headers, None)})
            async for chunk in self.relay:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send(_END)
            self.completed = True
        except asyncio.CancelledError as exc:
            if not watch.gone:  # the client left: the relay's outcome says so (absorbed by ``stop``)
                if not cut_by_shutdown(exc):
                    raise
                absorb_cancel()
                await self._end_cut(send)
        finally:
            watch.stop()
            with anyio.CancelScope(shield=True):
                await self.relay.close()

    async def _end_cut(self, send: Send) -> None:
        if self.completed:
            return
        relay = self.relay
        events = b""
        if relay.outcome is Outcome.CLIENT_DISCONNECT:  # the relay had not seen the stream end
            relay.outcome = Outcome.SHUTDOWN
            events = stream_error(relay.endpoint, SHUTDOWN_MESSAGE, ShuttingDown.code)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAST_SEND_S):
                if events:
                    await send({"type": "http.response.body", "body": events, "more_body": True})
                await send(_END)
