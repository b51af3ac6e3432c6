"""Flow control: when every worker of a tier is at its capacity, requests wait here — not in the
engine's FIFO — and are let through in weighted fair order across tenants.

A tier with ``max_inflight`` has a capacity per worker (ours in flight plus what the worker reports
running or waiting for others). A request that finds no room, or finds others already waiting,
joins the tier's queue; when a worker frees a slot (``WorkerPool.release``, or a scrape or check
that shows room) the next waiter is handed that slot. The order is start-time fair queueing:
each tenant has a FIFO, each waiter a virtual finish tag ``max(V, tenant's last tag) + 1/weight``,
and the smallest tag among the tenants' heads goes first — so a tenant holding ten times the
capacity in the queue does not delay another tenant's request by more than about one turn, while
it still gets every slot nobody else wants. Priority classes are strict: a batch request waits
while any interactive one does.

The queue is bounded (``max_queue``: then 503 at once) and so is the wait (``queue_timeout_ms``:
then 503 ``tier_saturated`` with ``Retry-After``). A route's ``spill_after_ms`` sends the request to
its fallback instead, when the expected wait (its place in the queue times the interval at which
slots free up) or the actual wait passes the bound. A waiter that is cancelled (its client left)
leaves the queue, and a slot handed to it is passed on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from gateway.errors import TierSaturated
from gateway.policy.schema import Priority, Tier
from gateway.pool import WorkerPool

_EWMA = 0.2  # weight of the newest interval between freed slots


class _Waiter:
    __slots__ = ("future", "tag", "tenant")

    def __init__(self, future: asyncio.Future[None], tenant: str, tag: float):
        self.future = future
        self.tenant = tenant
        self.tag = tag


class _Queue:
    """One tier's waiters: per priority class, per tenant FIFOs."""

    __slots__ = ("classes", "count", "finish", "granted", "interval", "last_free", "vtime")

    def __init__(self) -> None:
        self.classes: list[dict[str, deque[_Waiter]]] = [{} for _ in Priority]
        self.finish: dict[str, float] = {}  # tenant -> virtual finish tag of its last waiter
        self.vtime = 0.0  # the tag of the waiter let through last
        self.count = 0
        self.granted = 0  # slots handed to waiters that have not taken them yet
        self.interval: float | None = None  # seconds between freed slots while the queue is not empty
        self.last_free: float | None = None

    def push(self, tenant: str, weight: int, priority: Priority, future: asyncio.Future[None]) -> _Waiter:
        tag = max(self.vtime, self.finish.get(tenant, 0.0)) + 1.0 / weight
        self.finish[tenant] = tag
        waiter = _Waiter(future, tenant, tag)
        self.classes[priority].setdefault(tenant, deque()).append(waiter)
        self.count += 1
        return waiter

    def pop(self) -> _Waiter | None:
        for fifos in self.classes:
            if not fifos:
                continue
            tenant = min(fifos, key=lambda t: fifos[t][0].tag)
            fifo = fifos[tenant]
            waiter = fifo.popleft()
            if not fifo:
                del fifos[tenant]
            self.count -= 1
            self.vtime = max(self.vtime, waiter.tag)
            if not self.count:
                self.finish.clear()  # every tag is now at most vtime: nothing to remember
            return waiter
        return None

    def remove(self, waiter: _Waiter, priority: Priority) -> None:
        fifo = self.classes[priority].get(waiter.tenant)
        if fifo is None or waiter not in fifo:
            return
        fifo.remove(waiter)
        if not fifo:
            del self.classes[priority][waiter.tenant]
        self.count -= 1


class FlowControl:
    """The queues of every gated tier of one gateway process."""

    def __init__(self, pool: WorkerPool, clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self.clock = clock
        self._queues: dict[str, _Queue] = {}
        pool.on_free = self.wake

    def must_wait(self, tier: str) -> bool:
        """Must a request for ``tier`` queue? Yes when others already wait (no overtaking) or no
        worker has room beyond the slots already handed to waiters."""
        q = self._queues.get(tier)
        if q is None:
            return self.pool.room(tier) <= 0
        return q.count > 0 or self.pool.room(tier) - q.granted <= 0

    def queued(self, tier: str) -> int:
        q = self._queues.get(tier)
        return q.count if q is not None else 0

    def expected_wait(self, tier: str, ahead: int) -> float | None:
        """Seconds until a request with ``ahead`` waiters before it gets a slot; None: unknown yet."""
        q = self._queues.get(tier)
        if q is None or q.interval is None:
            return None
        return (ahead + 1) * q.interval

    async def enter(
        self, tier: Tier, tenant: str, weight: int, priority: Priority, spill_after_s: float | None
    ) -> tuple[bool, float]:
        """Wait for a slot on ``tier``. Returns (True, seconds waited) once a slot is this request's
        — the caller takes it at once, with no ``await`` in between — or (False, seconds waited) to
        spill to the fallback. Raises ``TierSaturated`` when the queue is full or the wait too long."""
        q = self._queues.setdefault(tier.name, _Queue())
        started = self.clock()
        expected = self.expected_wait(tier.name, q.count)
        if spill_after_s is not None and expected is not None and expected > spill_after_s:
            return False, 0.0
        if q.count >= tier.max_queue:
            raise TierSaturated(
                f"Tier {tier.name!r} is at capacity and {q.count} requests are waiting for it; please retry.",
                headers={"retry-after": _retry_after(expected)},
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = q.push(tenant, weight, priority, future)
        self.wake(tier.name)  # room may have come free with nothing to report it (a scrape, a check)
        limit = tier.queue_timeout_s if spill_after_s is None else min(tier.queue_timeout_s, spill_after_s)
        granted = False
        try:
            async with asyncio.timeout(limit):
                await future
            granted = True
        except TimeoutError:
            if spill_after_s is not None and spill_after_s < tier.queue_timeout_s:
                return False, self.clock() - started
            raise TierSaturated(
                f"Tier {tier.name!r} stayed at capacity for {tier.queue_timeout_s:g}s; please retry.",
                headers={"retry-after": _retry_after(self.expected_wait(tier.name, q.count))},
            ) from None
        finally:
            if granted:
                q.granted -= 1
            elif future.done() and not future.cancelled():
                q.granted -= 1  # handed a slot as it gave up: pass the slot on
                self.wake(tier.name)
            else:
                future.cancel()
                q.remove(waiter, priority)
        return True, self.clock() - started

    def wake(self, tier: str, freed: bool = False) -> None:
        """Hand the slots that are free on ``tier`` to its next waiters, in fair order; ``freed``:
        a request just ended there (the interval between those, while requests wait, is the
        queue's drain rate)."""
        q = self._queues.get(tier)
        if q is None:
            return
        if freed:
            now = self.clock()
            if q.count and q.last_free is not None:
                gap = now - q.last_free
                q.interval = gap if q.interval is None else (1 - _EWMA) * q.interval + _EWMA * gap
            q.last_free = now if q.count else None  # a gap counts only from a free with waiters
        if not q.count:
            return
        room = self.pool.room(tier) - q.granted
        while room > 0:
            waiter = q.pop()
            if waiter is None:
                return
            if waiter.future.done():
                continue
            waiter.future.set_result(None)
            q.granted += 1
            room -= 1


def _retry_after(expected: float | None) -> str:
    return str(max(1, math.ceil(expected))) if expected is not None else "1"
