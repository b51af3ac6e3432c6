"""The worker transport against real sockets: keep-alive reuse, stale connections, bad peers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from gateway.transport import MAX_HEAD_BYTES, MAX_HEADERS, WorkerTransport
from tests.procs import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Peer:
    """A raw HTTP peer that plays a worker, well or badly; every socket is closed at the end."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.transports: list[WorkerTransport] = []

    async def serve(self, handler: Handler) -> tuple[asyncio.Server, str]:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            await handler(reader, writer)

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        self.servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return server, f"http://127.0.0.1:{port}"

    def transport(self) -> WorkerTransport:
        t = WorkerTransport()
        self.transports.append(t)
        return t

    async def close(self) -> None:
        for t in self.transports:
            await t.aclose()
        for w in self.writers:
            w.close()
        for s in self.servers:
            s.close()
            await s.wait_closed()
        await asyncio.sleep(0.01)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    yield p
    await p.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + await reader.readexactly(length)


def post(url: str, body: bytes = b'{"a": 1}') -> httpx.Request:
    return httpx.Request(
        "POST",
        url + "/v1/x",
        content=body,
        headers={"content-type": "application/json"},
        extensions={"timeout": {"connect": 1.0}},
    )


async def body_of(response: httpx.Response) -> bytes:
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    return b"".join([c async for c in stream])


async def test_round_trip_and_connection_reuse(peer: Peer) -> None:
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}')
            await writer.drain()
        writer.close()

    _, url = await peer.serve(handler)
    t = peer.transport()
    for _ in range(3):
        r = await t.handle_async_request(post(url))
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert await body_of(r) == b'{"ok":true}'
        await r.aclose()
    assert connections == 1
    first = seen[0]
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"content-length: 8\r\n" in first
    assert first.endswith(b'\r\n\r\n{"a": 1}')


async def test_chunked_and_streamed_bodies(peer: Peer) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    _, url = await peer.serve(handler)
    t = peer.transport()
    r = await t.handle_async_request(post(url))
    stream = r.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    chunks = aiter(stream)
    assert await anext(chunks) == b"hello"  # delivered before the rest exists
    release.set()
    assert b"".join([c async for c in chunks]) == b" world"


async def test_stale_keep_alive_connection_is_retried_on_a_new_one(peer: Peer) -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # keep the connection open a moment, then close it as an idle keep-alive timeout would
        await asyncio.sleep(0.05)
        writer.close()

    _, url = await peer.serve(handler)
    t = peer.transport()
    r = await t.handle_async_request(post(url))
    assert await body_of(r) == b"ok"
    await asyncio.sleep(0.01)  # the pooled connection is still open here, closed by the server soon after
    await asyncio.sleep(0.1)
    r = await t.handle_async_request(post(url))
    assert r.status_code == 200
    assert await body_of(r) == b"ok"
    assert served == 2


async def test_closing_a_response_early_closes_its_connection(peer: Peer) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        assert await reader.read() == b""  # EOF: the gateway hung up
        closed.set()

    _, url = await peer.serve(handler)
    t = peer.transport()
    r = await t.handle_async_request(post(url))
    stream = r.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    assert await anext(aiter(stream)) == b"abc"
    await r.aclose()
    await asyncio.wait_for(closed.wait(), 5)


async def test_connection_refused_is_connect_error(peer: Peer) -> None:
    t = peer.transport()
    with pytest.raises(httpx.ConnectError):
        await t.handle_async_request(post(f"http://127.0.0.1:{free_port()}"))


async def test_peer_closing_before_answering_is_read_error(peer: Peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    _, url = await peer.serve(handler)
    with pytest.raises(httpx.ReadError):
        await peer.transport().handle_async_request(post(url))


async def test_garbage_from_the_peer_is_a_protocol_error(peer: Peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    _, url = await peer.serve(handler)
    with pytest.raises(httpx.RemoteProtocolError):
        await peer.transport().handle_async_request(post(url))


async def test_drop_mid_body_is_read_error(peer: Peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    _, url = await peer.serve(handler)
    r = await peer.transport().handle_async_request(post(url))
    with pytest.raises(httpx.ReadError):
        await body_of(r)


async def test_it_serves_an_httpx_client(peer: Peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"GET /health HTTP/1.1")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    _, url = await peer.serve(handler)
    async with httpx.AsyncClient(transport=peer.transport()) as client:
        assert (await client.get(url + "/health")).status_code == 200


async def test_too_many_headers_is_a_protocol_error(peer: Peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        heads = b"".join(b"x-h%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
        writer.write(b"HTTP/1.1 200 OK\r\n" + heads + b"content-length: 2\r\n\r\n{}")
        await writer.drain()

    _, url = await peer.serve(handler)
    with pytest.raises(httpx.RemoteProtocolError, match=f"more than {MAX_HEADERS} headers"):
        await peer.transport().handle_async_request(post(url))


async def test_a_huge_response_head_fails_before_it_is_buffered(peer: Peer) -> None:
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: ")
        piece = b"a" * (16 << 10)
        try:
            while sent < 50 << 20:  # a 50 MB header line
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
        except ConnectionError:
            pass

    _, url = await peer.serve(handler)
    with pytest.raises(httpx.RemoteProtocolError, match=f"larger than {MAX_HEAD_BYTES} bytes"):
        await asyncio.wait_for(peer.transport().handle_async_request(post(url)), 10)
    assert sent < 4 << 20  # it gave up at the bound (plus what sockets buffer), not at the end


async def test_switching_protocols_fails_without_a_fatal_transport_error(peer: Peer) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\x81\x05hello"
        )
        await writer.drain()

    _, url = await peer.serve(handler)
    try:
        with pytest.raises(httpx.RemoteProtocolError, match="switched protocols"):
            await peer.transport().handle_async_request(post(url))
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_send_with_plain_values_reuses_the_connection(peer: Peer) -> None:
    """The default path: no httpx objects, the same connection for every request, the body read
    whole or iterated."""
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}')
            await writer.drain()
        writer.close()

    _, url = await peer.serve(handler)
    t = peer.transport()
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"rid-1"), (b"Host", b"ignored")]
    answer = await t.send("POST", url, "/v1/x", headers, b'{"a": 1}', 1.0)
    assert answer.status == 200
    assert answer.header("content-type") == "application/json"  # names compared case-insensitively
    assert answer.header("x-missing") is None
    assert await answer.read() == b'{"ok":true}'
    answer = await t.send("POST", url, "/v1/x", headers, b"{}", 1.0)
    assert b"".join([c async for c in answer]) == b'{"ok":true}'
    await answer.aclose()
    assert connections == 1
    first = seen[0]
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"x-request-id: rid-1\r\n" in first
    assert b"Host: ignored" not in first  # hop-by-hop and host headers are the transport's own
    assert first.endswith(b'content-length: 8\r\n\r\n{"a": 1}')


async def test_send_reports_when_the_request_is_on_the_wire(peer: Peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()  # never answers

    _, url = await peer.serve(handler)
    sent: list[bool] = []
    with pytest.raises(httpx.ReadError):
        await peer.transport().send("POST", url, "/v1/x", [], b"{}", 1.0, lambda: sent.append(True))
    assert sent == [True]  # written, so the worker may have seen it (billing counts it as reached)


async def test_send_refuses_other_schemes(peer: Peer) -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await peer.transport().send("POST", "https://127.0.0.1:1", "/v1/x", [], b"{}", 1.0)
