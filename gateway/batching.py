"""Work that is done in batches after the response: settlements and ledger records.

``flush_loop`` calls ``flush`` every ``interval_s``, or at once when a producer sets ``wake``
(a batch is full). Producers append to their own queues; only the flushing is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


async def flush_loop(wake: asyncio.Event, flush: Callable[[], Awaitable[object]], interval_s: float) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await wake.wait()
        wake.clear()
        await flush()
