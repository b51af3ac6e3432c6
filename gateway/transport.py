"""The worker leg's HTTP/1.1 client: ``WorkerTransport``, and the one seam dispatch talks through.

Dispatch sends a request as plain values — method, the worker's base URL, a path, a few header
pairs and the body bytes — and gets an ``Answer`` back: a status, the raw header pairs, and the
body (whole with ``read``, or chunk by chunk as it arrives by iterating). ``WorkerTransport``
answers that directly: no ``httpx.Request``/``Response``/``Headers``/``URL`` objects are made per
request (building and re-reading them cost about a sixth of the governed gateway's CPU).
``HttpxWorkerClient`` puts the same seam over any ``httpx.AsyncBaseTransport`` — ``httpx.MockTransport``
in tests, httpx's own and httpx-aiohttp's when ``GATEWAY_TRANSPORT`` chooses them — and
``WorkerTransport`` is also an httpx transport itself (``handle_async_request``), so the pool's
health checks and load scrapes share its connections through an ``httpx.AsyncClient``. Failures
are httpx's exception classes whichever way it is called.

Underneath, keep-alive connections are plain asyncio protocols with httptools' parser. The
benchmark (bench/results/latest.md) shows why: on one core the gateway serves ~55% more requests
per second with it than with httpx-aiohttp's transport (~7x more than with httpx's own) and adds
~0.45 ms less latency per request.

Connections are kept per worker and reused while the worker keeps them open (vLLM closes idle
ones after 5 s, so idle connections older than ``idle_s`` are dropped first). A request that fails
on a *reused* connection before any byte of the answer arrived is sent once more on a new
connection — the worker may simply have closed it — so a stale connection is never mistaken for a
failing worker. Only a connect time-out is applied here; callers bound the wait for an answer
themselves (dispatch's first-byte and idle time-outs). Closing an answer before its end closes
the connection, which is how the worker learns that the client went away and stops generating.

A worker's response head is bounded — at most ``MAX_HEAD_BYTES`` and ``MAX_HEADERS`` header
lines — like any peer's: past either the attempt fails as a protocol error, before more is
buffered (httptools keeps an unfinished header in memory). So does a ``101 Switching Protocols``:
the gateway speaks HTTP/1.1 to workers and nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit

import httptools
import httpx

MAX_HEAD_BYTES = 64 << 10  # a worker's status line and headers (vLLM sends ~150 bytes)
MAX_HEADERS = 100

Header = tuple[bytes, bytes]
_HOP = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection"))


class Answer(Protocol):
    """A worker's answer whose body has not been read yet. ``aclose`` must be called once (it
    closes the connection if the body was not read to its end)."""

    @property
    def status(self) -> int: ...

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        ...

    async def read(self) -> bytes: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class _HeadTooLarge(Exception):
    pass


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[Header] = []
        self.status = 0
        self.head_bytes = 0  # of the response head, while it is unfinished
        self.head_done = False
        self.head: asyncio.Future[None] | None = None
        self.chunks: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.lost: BaseException | None = None
        self.received_any = False
        self.keep_alive = True
        self.idle_since = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error("the worker switched protocols (101); it must answer HTTP/1.1")
            return
        except httptools.HttpParserError as exc:
            too_large = isinstance(exc.__context__, _HeadTooLarge)
            self._protocol_error(str(exc.__context__) if too_large else f"invalid HTTP response from worker: {exc}")
            return
        if not self.head_done:
            self.head_bytes += len(data)  # all of it was head: the head is not complete yet
            if self.head_bytes > MAX_HEAD_BYTES:
                self._protocol_error(f"the worker's response head is larger than {MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete:
            self._fail(httpx.ReadError(f"worker closed the connection{f': {exc}' if exc else ''}"))
        self.keep_alive = False

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(self.headers) > MAX_HEADERS:
            raise _HeadTooLarge(f"the worker's response has more than {MAX_HEADERS} headers")

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.status == 101:
            return  # not an answer: the parser raises HttpParserUpgrade next, which fails the attempt
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- helpers
    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _protocol_error(self, message: str) -> None:
        self._fail(httpx.RemoteProtocolError(message))
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def start(self, payload: bytes) -> asyncio.Future[None]:
        self.headers = []
        self.status = 0
        self.head_bytes = 0
        self.head_done = False
        self.complete = False
        self.received_any = False
        self.chunks.clear()
        self.head = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(payload)
        return self.head

    def take(self) -> bytes:
        """Everything received and not yet taken (pieces that arrived together, as one)."""
        chunks = self.chunks
        if len(chunks) == 1:
            return chunks.popleft()
        data = b"".join(chunks)
        chunks.clear()
        return data

    async def next_chunk(self) -> bytes:
        """The next received data; b"" at the end of the body."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.lost is not None:
                raise self.lost
            self.waiter = self.loop.create_future()
            await self.waiter
        return self.take()

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.lost is None

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


class WorkerAnswer:
    """``Answer`` on one of ``WorkerTransport``'s connections; the connection goes back to the
    pool once the body has been read to its end."""

    __slots__ = ("_conn", "_key", "_owner", "headers", "status")

    def __init__(self, owner: WorkerTransport, key: tuple[str, int], conn: _Connection):
        self._owner = owner
        self._key = key
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: str) -> str | None:
        want = name.encode()
        for key, value in self.headers:
            if key.lower() == want:
                return value.decode("latin-1")
        return None

    async def read(self) -> bytes:
        conn = self._conn
        if conn is None:
            return b""
        if conn.complete:  # the common case: the whole answer came with its head
            data = conn.take() if conn.chunks else b""
        else:
            parts = []
            while chunk := await conn.next_chunk():
                parts.append(chunk)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._release()
        return data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        while chunk := await conn.next_chunk():
            yield chunk
        self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.complete and conn.keep_alive and conn.usable:
                self._owner._put(self._key, conn)
            else:
                conn.close()

    async def aclose(self) -> None:
        self._release()


class _Body(httpx.AsyncByteStream):
    """A ``WorkerAnswer``'s body as httpx's stream (for ``handle_async_request``)."""

    def __init__(self, answer: WorkerAnswer):
        self.answer = answer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.answer:
            yield chunk

    async def aclose(self) -> None:
        await self.answer.aclose()


SENT = "gateway.sent"
"""A request extension: a callable the transport calls once the request is written to the worker."""


class _Origin:
    """A worker's base URL, parsed once: where to connect and how requests to it start."""

    __slots__ = ("host", "key", "netloc", "prefix")

    def __init__(self, base: str):
        url = urlsplit(base)
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"the worker transport speaks plain http, not {url.scheme!r}")
        self.host = url.hostname or ""
        self.key = (self.host, url.port or 80)
        self.netloc = url.netloc.encode()
        self.prefix = url.path.rstrip("/").encode()


class WorkerTransport(httpx.AsyncBaseTransport):
    reports_sent = True  # calls on_sent (through httpx: request.extensions[SENT])

    def __init__(self, *, max_idle_per_worker: int = 256, idle_s: float = 4.0):
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._origins: dict[str, _Origin] = {}
        self.max_idle_per_worker = max_idle_per_worker
        self.idle_s = idle_s

    def _put(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle_per_worker:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        cutoff = time.monotonic() - self.idle_s
        while idle:
            conn = idle.pop()
            if conn.usable and conn.idle_since >= cutoff:
                return conn
            conn.close()
        return None

    async def _connect(self, host: str, port: int, connect_timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop), host, port)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return conn

    def _origin(self, base: str) -> _Origin:
        origin = self._origins.get(base)
        if origin is None:
            if len(self._origins) > 10_000:
                self._origins.clear()
            origin = self._origins[base] = _Origin(base)
        return origin

    async def send(
        self,
        method: str,
        base: str,
        path: str,
        headers: Sequence[Header],
        body: bytes,
        connect_timeout: float | None,
        on_sent: Callable[[], None] | None = None,
    ) -> WorkerAnswer:
        origin = self._origin(base)
        return await self._send(
            origin.key,
            origin.netloc,
            method.encode() + b" " + origin.prefix + path.encode(),
            headers,
            body,
            connect_timeout,
            on_sent,
        )

    async def _send(
        self,
        key: tuple[str, int],
        netloc: bytes,
        request_line: bytes,
        headers: Sequence[Header],
        body: bytes,
        connect_timeout: float | None,
        on_sent: Callable[[], None] | None,
    ) -> WorkerAnswer:
        lines = [request_line, b" HTTP/1.1\r\nhost: ", netloc, b"\r\n"]
        for name, value in headers:
            if name.lower() not in _HOP:
                lines += [name, b": ", value, b"\r\n"]
        lines += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body]
        payload = b"".join(lines)
        for _ in range(2):
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key[0], key[1], connect_timeout)
            try:
                head = conn.start(payload)
                if on_sent is not None:
                    on_sent()  # the request is on the wire: from here on the worker may be working on it
                await head
            except httpx.TransportError:
                conn.close()
                if reused and not conn.received_any:
                    continue  # the worker had closed this idle connection: try a fresh one
                raise
            except BaseException:
                conn.close()
                raise
            return WorkerAnswer(self, key, conn)
        raise httpx.ReadError("worker closed the connection")  # pragma: no cover

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """The same requests through httpx's API (health checks, load scrapes)."""
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"the worker transport speaks plain http, not {url.scheme!r}")
        answer = await self._send(
            (url.host, url.port or 80),
            url.netloc,
            request.method.encode() + b" " + url.raw_path,
            request.headers.raw,
            request.content,
            request.extensions.get("timeout", {}).get("connect"),
            request.extensions.get(SENT),
        )
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=_Body(answer),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class HttpxAnswer:
    """``Answer`` over an ``httpx.Response`` (the transports other than ``WorkerTransport``)."""

    __slots__ = ("response",)

    def __init__(self, response: httpx.Response):
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status_code

    def header(self, name: str) -> str | None:
        value: str | None = self.response.headers.get(name)
        return value

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        stream = self.response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        async for chunk in stream:
            yield chunk

    async def aclose(self) -> None:
        await self.response.aclose()


class HttpxWorkerClient:
    """``WorkerClient`` over any httpx transport: ``httpx.MockTransport`` in tests, httpx's own or
    httpx-aiohttp's when ``GATEWAY_TRANSPORT`` chooses them."""

    def __init__(self, transport: httpx.AsyncBaseTransport):
        self.transport = transport
        self.reports_sent = bool(getattr(transport, "reports_sent", False))

    async def send(
        self,
        method: str,
        base: str,
        path: str,
        headers: Sequence[Header],
        body: bytes,
        connect_timeout: float | None,
        on_sent: Callable[[], None] | None = None,
    ) -> Answer:
        extensions: dict[str, object] = {
            "timeout": {"connect": connect_timeout, "read": None, "write": connect_timeout, "pool": None}
        }
        if on_sent is not None:
            extensions[SENT] = on_sent
        request = httpx.Request(method, base + path, content=body, headers=list(headers), extensions=extensions)
        return HttpxAnswer(await self.transport.handle_async_request(request))


WorkerClient = WorkerTransport | HttpxWorkerClient
"""What dispatch sends through: ``send(method, base, path, headers, body, connect_timeout, on_sent)``
gives an ``Answer``; ``reports_sent``: ``on_sent`` is called once the request is on the wire (else
never: the caller must assume the worker may have seen it)."""


def worker_client(transport: httpx.AsyncBaseTransport) -> WorkerClient:
    """The seam over ``transport``: ``WorkerTransport`` itself, any other through httpx's objects."""
    if isinstance(transport, WorkerTransport):
        return transport
    return HttpxWorkerClient(transport)
