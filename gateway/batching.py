"""Work that is done in batches after the response: settlements, ledger records, response index entries.

``flush_loop`` calls ``flush`` every ``interval_s``, or at once when a producer sets ``wake``
(a batch is full). ``flush_when_queued`` does the same while there is work, and sleeps — no timer,
no wake-up of the event loop — while there is none: producers tell it with ``Wake.queued`` (the
first item of a batch starts the interval, a full batch flushes at once), and after each flush
``pending`` says whether anything is left (a batch put back, a spool to replay), which keeps it
ticking. An idle gateway's loop used to wake ~225 times a second for these timers; a timer that
fires in the middle of a request is also latency for that request.

Producers append to their own queues; only the flushing is shared. Cancelling a loop (shutdown)
never cuts a flush in half — a batch taken off its queue would be lost: the flush under way is
shielded and completes, and the shutdown's own last flush follows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


async def flush_loop(wake: asyncio.Event, flush: Callable[[], Coroutine[Any, Any, object]], interval_s: float) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await wake.wait()
        wake.clear()
        await asyncio.shield(flush())


class Wake:
    """How producers reach a ``flush_when_queued`` loop. It starts with work to do (one flush at
    start-up: a spool left by an earlier run is replayed without waiting for traffic)."""

    __slots__ = ("now", "work")

    def __init__(self) -> None:
        self.work = asyncio.Event()  # something is queued
        self.now = asyncio.Event()  # flush without waiting for the interval
        self.work.set()

    def queued(self, size: int, batch: int) -> None:
        """An item was queued; the queue now holds ``size`` (a batch is ``batch``)."""
        if size >= batch:
            self.flush_now()
        elif size == 1:
            self.work.set()

    def flush_now(self) -> None:
        self.work.set()
        self.now.set()


async def flush_when_queued(
    wake: Wake,
    flush: Callable[[], Coroutine[Any, Any, object]],
    interval_s: float,
    pending: Callable[[], bool],
) -> None:
    while True:
        await wake.work.wait()
        if not wake.now.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await wake.now.wait()
        wake.work.clear()
        wake.now.clear()
        await asyncio.shield(flush())
        if pending():
            wake.work.set()
