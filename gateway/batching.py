"""Work that is done in batches after the response: settlements and ledger records.

``flush_loop`` calls ``flush`` every ``interval_s``, or at once when a producer sets ``wake``
(a batch is full). Producers append to their own queues; only the flushing is shared.
Cancelling the loop (shutdown) never cuts a flush in half — a batch taken off its queue would be
lost: the flush under way is shielded and completes, and the shutdown's own last flush follows.
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
