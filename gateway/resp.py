"""A minimal pipelined Redis connection for the admission hot path.

Admission makes one script call per request before it is forwarded and one (batched) after; on
the benchmark redis-py's per-command machinery (connection pool, locks, command objects) cost
the gateway about a fifth of its CPU. This connection does only what those two calls need:
commands are written as they come on one connection, replies (parsed by hiredis) resolve the
callers' futures in order, so many requests share a round trip's worth of latency without a pool.

Every call is bounded by ``timeout_s`` (see ``_Protocol`` for how, cheaply). If the connection
drops, pending calls fail at once and the next call reconnects. A script call whose reply is
NOSCRIPT (Redis restarted with an empty script cache) is resent once after loading the script:
``call_script`` and ``pipeline_script`` are the one place that happens.
Everything else the gateway does with Redis goes through redis-py.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import sys
import termios
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import hiredis


class RedisError(Exception):
    """Redis answered with an error, or could not be reached in time."""


Late = Callable[[Any], None]
"""Called with the reply of a command whose caller stopped waiting (time-out, cancellation), or
with ``LOST``: so that a reservation made by a reply nobody read can still be released."""

STUCK_S = 5.0
"""A connection whose oldest call has waited this long is closed (the next call reconnects). Until
then late replies are still read, so callers that gave up can learn what their command did."""


REDIS_ERRORS = (RedisError, OSError, TimeoutError)
"""What a call on this connection may raise: an error reply, a lost connection, a time-out."""


def noscript(reply: object) -> bool:
    """Redis did not run a script because its script cache is empty (after a restart)."""
    return isinstance(reply, RedisError) and str(reply).startswith("NOSCRIPT")


class ConnectionLost(RedisError):
    """The connection dropped after the command was sent: it may or may not have run."""


LOST: Final = ConnectionLost("the connection was lost before Redis answered")
"""What a late-reply callback receives when the reply can never come: the command may or may not
have run."""


class _Protocol(asyncio.Protocol):
    """Replies come back in the order commands were sent, so pending calls are a FIFO of
    (future, deadline). Deadlines are enforced by one sweep timer per connection rather than a
    timer per call (``asyncio.timeout`` per call cost ~6% of the gateway's CPU on the benchmark):
    an overdue call fails at once but keeps its place, so the late reply is matched and handed to
    the call's ``late`` callback, if it has one (else dropped). A connection whose oldest call has
    waited ``STUCK_S`` is closed; the next call reconnects.

    A time-out says Redis did not answer, never that the event loop was too busy to read the answer.
    Under CPU overload a loop turn can take longer than the time-out while Redis replies in
    microseconds, and uvloop runs timers before it polls sockets, so the sweep would see the reply
    as missing. Two guards: deadlines run on a clock that stops while the loop is stalled (the
    sweep's own lateness is added to ``stalled``), and overdue calls are failed only if no reply
    bytes wait unread in the socket (``FIONREAD``, one syscall, only when something is overdue)."""

    def __init__(self, timeout_s: float) -> None:
        self.reader = hiredis.Reader(replyError=RedisError)
        self.pending: deque[tuple[asyncio.Future[Any], float, Late | None]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.due = 0.0  # when the pending sweep should run
        self.stalled = 0.0  # seconds the loop ran sweeps late: deadlines are on loop.time() - stalled
        self.outbox: list[bytes] = []

    def send(self, payload: bytes, fut: asyncio.Future[Any], late: Late | None = None) -> None:
        """Queue a command; everything queued in one turn of the event loop goes out in one write.
        ``late`` gets the reply if ``fut`` is already done (timed out, cancelled) when it comes."""
        self.expect(fut, late)
        if not self.outbox:
            self.loop.call_soon(self._write)
        self.outbox.append(payload)

    def _write(self) -> None:
        out, self.outbox = self.outbox, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def expect(self, fut: asyncio.Future[Any], late: Late | None = None) -> None:
        self.pending.append((fut, self.loop.time() - self.stalled + self.timeout_s, late))
        if self.timer is None:
            self._schedule()

    def _schedule(self) -> None:
        interval = self.timeout_s / 4
        self.due = self.loop.time() + interval
        self.timer = self.loop.call_later(interval, self.sweep)

    def sweep(self) -> None:
        self.timer = None
        lag = self.loop.time() - self.due
        if lag > 0:
            self.stalled += lag  # the loop could not look: that time does not count against Redis
        now = self.loop.time() - self.stalled
        if self.pending and self.pending[0][1] <= now and self._unread():
            self._schedule()  # Redis has answered; the loop reads it this turn
            return
        for fut, deadline, _ in self.pending:
            if deadline > now:
                break
            if not fut.done():
                fut.set_exception(TimeoutError(f"Redis did not answer within {self.timeout_s}s"))
        stuck = max(4 * self.timeout_s, STUCK_S)
        if self.pending and self.pending[0][1] < now - stuck and self.transport is not None:
            self.transport.close()  # stuck: give up on this connection
        if self.pending:
            self._schedule()

    def _unread(self) -> bool:
        """Whether reply bytes wait in the socket, not yet read by the loop."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            count = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return int.from_bytes(count, sys.byteorder) > 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            fut, _, late = self.pending.popleft()
            if not fut.done():
                if isinstance(reply, RedisError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
            elif late is not None:
                late(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending:
            fut, _, late = self.pending.popleft()
            if not fut.done():
                fut.set_exception(ConnectionLost(f"connection to Redis lost{f': {exc}' if exc else ''}"))
            elif late is not None:
                late(LOST)


def encode(args: tuple[bytes | str | int | float, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def bulk(value: str | int) -> bytes:
    """One RESP bulk string: for commands encoded ahead of time in parts (admission's call)."""
    b = str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


class Connection(Protocol):
    """What the admission, ledger and response-index stages need from a pipelined connection:
    ``RespConnection`` (one Redis) or ``cluster.ClusterConnection`` (one per primary of a cluster)."""

    cluster: bool  # script calls must keep their keys in one hash slot (a cluster refuses the rest)

    def on_connect(self, hook: Callable[[], None]) -> None: ...

    async def call(self, *args: bytes | str | int | float) -> Any: ...

    async def call_raw(self, payload: bytes, late: Late | None = None) -> Any: ...

    @property
    def connected(self) -> bool: ...

    def send_nowait(self, payload: bytes, late: Late | None = None) -> asyncio.Future[Any] | None: ...

    async def pipeline(self, commands: Sequence[tuple[bytes | str | int | float, ...]]) -> list[Any]: ...

    async def close(self) -> None: ...


class RespConnection:
    cluster = False

    def __init__(self, url: str, timeout_s: float = 0.25):
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.lstrip("/") or 0)
        self.password = parts.password
        self.username = parts.username
        self.timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._on_connect: list[Callable[[], None]] = []

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` each time a connection is made, before any other command is sent on it
        (it may send commands with ``send_nowait``: they go first)."""
        self._on_connect.append(hook)

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and not self._proto.lost:
                return self._proto
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout_s):
                    _, proto = await loop.create_connection(lambda: _Protocol(self.timeout_s), self.host, self.port)
            except TimeoutError:
                raise RedisError(f"cannot connect to Redis at {self.host}:{self.port}: timed out") from None
            except OSError as exc:
                raise RedisError(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from None
            setup: list[tuple[bytes | str | int | float, ...]] = []
            if self.password:
                setup.append(("AUTH", *((self.username,) if self.username else ()), self.password))
            if self.db:
                setup.append(("SELECT", self.db))
            for args in setup:
                fut = loop.create_future()
                proto.send(encode(args), fut)
                await fut
            self._proto = proto
            for hook in self._on_connect:
                hook()
            return proto

    async def call(self, *args: bytes | str | int | float) -> Any:
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        fut: asyncio.Future[Any] = proto.loop.create_future()
        proto.send(encode(args), fut)
        return await fut

    async def call_raw(self, payload: bytes, late: Late | None = None) -> Any:
        """One command already encoded in RESP (the admission path pre-encodes what does not change).
        If the caller stops waiting (time-out, cancellation), ``late`` still gets the reply, or
        ``LOST`` if the connection drops first."""
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        fut: asyncio.Future[Any] = proto.loop.create_future()
        proto.send(payload, fut, late)
        return await fut

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.lost

    def send_nowait(self, payload: bytes, late: Late | None = None) -> asyncio.Future[Any] | None:
        """Send one encoded command now, without waiting for its reply (the future has it, or the
        error); None if not connected — the caller takes its slower path."""
        proto = self._proto
        if proto is None or proto.lost:
            return None
        fut: asyncio.Future[Any] = proto.loop.create_future()
        proto.send(payload, fut, late)
        return fut

    async def pipeline(self, commands: Sequence[tuple[bytes | str | int | float, ...]]) -> list[Any]:
        """Send commands in one write; their replies (or the errors Redis gave) in order."""
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        futures = [proto.loop.create_future() for _ in commands]
        for fut, command in zip(futures, commands, strict=True):
            proto.send(encode(command), fut)
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await call_script(self, script, encode(("EVALSHA", script.sha, len(keys), *keys, *args)))

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


class Script:
    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


async def load(conn: Connection, script: Script) -> None:
    """SCRIPT LOAD (a cluster connection sends it to every node it knows)."""
    await conn.call("SCRIPT", "LOAD", script.source)


async def call_script(conn: Connection, script: Script, payload: bytes, late: Late | None = None) -> Any:
    """``call_raw`` of an EVALSHA of ``script``; on NOSCRIPT (not run) load it and send again."""
    try:
        return await conn.call_raw(payload, late)
    except RedisError as exc:
        if not noscript(exc):
            raise
    await load(conn, script)
    return await conn.call_raw(payload, late)


async def pipeline_script(
    conn: Connection,
    script: Script,
    commands: Sequence[tuple[bytes | str | int | float, ...]],
    resend: Callable[[Any], bool] = noscript,
) -> list[Any]:
    """``pipeline`` of calls to ``script`` (other commands may follow them); if any reply is one to
    ``resend`` (NOSCRIPT by default), load the script and send those commands once more. Only for
    idempotent scripts."""
    replies = await conn.pipeline(commands)
    again = [i for i, reply in enumerate(replies) if resend(reply)]
    if again:
        await load(conn, script)
        for i, reply in zip(again, await conn.pipeline([commands[i] for i in again]), strict=True):
            replies[i] = reply
    return replies
