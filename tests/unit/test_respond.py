"""The edge's one write per answer (``HeadFirst``), the request log line and the idle-sleeping flush loop."""

from __future__ import annotations

import asyncio
import io
import json

from gateway.batching import Wake, flush_when_queued
from gateway.edge import HeadFirst
from gateway.logging import RequestLog


class Recorder:
    """Stands in for the socket transport: what ``write`` was called with, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_head_goes_out_with_the_first_body_bytes() -> None:
    sock = Recorder()
    out = HeadFirst(sock)  # type: ignore[arg-type]
    out.holding = True
    out.write(b"HTTP/1.1 200 OK\r\n\r\n")
    out.holding = False
    assert sock.writes == []
    out.write(b"body")
    out.write(b"more")
    assert sock.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]


def test_a_head_without_body_is_flushed_and_close_sends_it_first() -> None:
    sock = Recorder()
    out = HeadFirst(sock)  # type: ignore[arg-type]
    out.holding = True
    out.write(b"HEAD")
    out.holding = False
    out.flush()
    out.flush()
    assert sock.writes == [b"HEAD"]
    out.holding = True
    out.write(b"HEAD2")
    out.holding = False
    out.close()
    assert sock.writes == [b"HEAD", b"HEAD2"] and sock.closed


async def test_request_lines_of_one_loop_turn_are_one_write() -> None:
    buf = io.BytesIO()
    log = RequestLog(20, buf)
    log.write(20, {"request_id": "a", "status": 200})
    log.write(10, {"request_id": "debug-is-below-the-level"})
    log.write(30, {"request_id": "b", "status": 503})
    assert buf.getvalue() == b""  # not yet: at the end of this turn
    await asyncio.sleep(0)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(x["request_id"], x["event"], x["level"]) for x in lines] == [
        ("a", "request", "info"),
        ("b", "request", "warning"),
    ]
    assert lines[0]["timestamp"].endswith("Z") and len(lines[0]["timestamp"]) == len("2026-11-27T20:53:54.199165Z")
    assert list(lines[0])[:2] == ["request_id", "status"]  # the event's fields first, as structlog wrote them


async def test_flush_loop_sleeps_until_something_is_queued() -> None:
    wake = Wake()
    queue: list[int] = []
    flushes: list[list[int]] = []

    async def flush() -> None:
        flushes.append(queue[:])
        queue.clear()

    task = asyncio.create_task(flush_when_queued(wake, flush, 0.01, lambda: bool(queue)))
    try:
        await asyncio.sleep(0.1)
        assert flushes == [[]]  # the start-up flush, then nothing: no timer while idle
        queue.append(1)
        wake.queued(len(queue), 100)
        for _ in range(100):
            if len(flushes) == 2:
                break
            await asyncio.sleep(0.01)
        assert flushes == [[], [1]]
        await asyncio.sleep(0.1)
        assert len(flushes) == 2
        queue.extend(range(100))  # a full batch flushes at once
        wake.queued(len(queue), 100)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(flushes) == 3
    finally:
        task.cancel()
