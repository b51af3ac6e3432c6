"""``WorkerTransport``: the HTTP/1.1 client the gateway talks to workers with — an httpx transport.

httpx stays the seam (``httpx.Request`` in, ``httpx.Response`` out, ``httpx.MockTransport`` in
tests); underneath, keep-alive connections are plain asyncio protocols with httptools' parser.
The benchmark (bench/results/latest.md) shows why: on one core the gateway serves ~55% more
requests per second with it than with httpx-aiohttp's transport (~7x more than with httpx's own)
and adds ~0.45 ms less latency per request.

Connections are kept per worker and reused while the worker keeps them open (vLLM closes idle
ones after 5 s, so idle connections older than ``idle_s`` are dropped first). A request that fails
on a *reused* connection before any byte of the answer arrived is sent once more on a new
connection — the worker may simply have closed it — so a stale connection is never mistaken for a
failing worker. Only the connect time-out of ``request.extensions["timeout"]`` is applied here;
callers bound the wait for an answer themselves (dispatch's first-byte and idle time-outs).
Closing a response before its end closes the connection, which is how the worker learns that
the client went away and stops generating.

A worker's response head is bounded — at most ``MAX_HEAD_BYTES`` and ``MAX_HEADERS`` header
lines — like any peer's: past either the attempt fails as a protocol error, before more is
buffered (httptools keeps an unfinished header in memory). So does a ``101 Switching Protocols``:
the gateway speaks HTTP/1.1 to workers and nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

MAX_HEAD_BYTES = 64 << 10  # a worker's status line and headers (vLLM sends ~150 bytes)
MAX_HEADERS = 100


class _HeadTooLarge(Exception):
    pass


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
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

    async def next_chunk(self) -> bytes:
        """Everything received so far (pieces that arrived together are handed over as one)."""
        chunks = self.chunks
        while not chunks:
            if self.complete:
                return b""
            if self.lost is not None:
                raise self.lost
            self.waiter = self.loop.create_future()
            await self.waiter
        if len(chunks) == 1:
            return chunks.popleft()
        data = b"".join(chunks)
        chunks.clear()
        return data

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.lost is None

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, owner: WorkerTransport, key: tuple[str, int], conn: _Connection):
        self.owner = owner
        self.key = key
        self.conn: _Connection | None = conn

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        if conn is None:
            return
        while True:
            chunk = await conn.next_chunk()
            if not chunk:
                break
            yield chunk
        self._release()

    def _release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            if conn.complete and conn.keep_alive and conn.usable:
                self.owner._put(self.key, conn)
            else:
                conn.close()

    async def aclose(self) -> None:
        self._release()


SENT = "gateway.sent"
"""A request extension: a callable the transport calls once the request is written to the worker."""


class WorkerTransport(httpx.AsyncBaseTransport):
    reports_sent = True  # calls request.extensions[SENT]

    def __init__(self, *, max_idle_per_worker: int = 256, idle_s: float = 4.0):
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
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

    @staticmethod
    def _payload(request: httpx.Request, host_header: bytes) -> bytes:
        body = request.content
        target = request.url.raw_path
        lines = [request.method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", host_header, b"\r\n"]
        for name, value in request.headers.raw:
            lname = name.lower()
            if lname in (b"host", b"content-length", b"transfer-encoding", b"connection"):
                continue
            lines += [name, b": ", value, b"\r\n"]
        lines += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body]
        return b"".join(lines)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"the worker transport speaks plain http, not {url.scheme!r}")
        host = url.host
        port = url.port or 80
        key = (host, port)
        timeout = request.extensions.get("timeout", {}).get("connect")
        sent = request.extensions.get(SENT)
        payload = self._payload(request, url.netloc)
        for _ in range(2):
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(host, port, timeout)
            try:
                head = conn.start(payload)
                if sent is not None:
                    sent()  # the request is on the wire: from here on the worker may be working on it
                await head
            except httpx.TransportError:
                conn.close()
                if reused and not conn.received_any:
                    continue  # the worker had closed this idle connection: try a fresh one
                raise
            except BaseException:
                conn.close()
                raise
            return httpx.Response(
                conn.status,
                headers=conn.headers,
                stream=_Body(self, key, conn),
                request=request,
                extensions={"http_version": b"HTTP/1.1"},
            )
        raise httpx.ReadError("worker closed the connection")  # pragma: no cover

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
