"""GCRA (a token bucket kept as one timestamp) in process: the same algorithm as ``lua/admit.lua``
and ``lua/settle.lua`` — the fail-open local limiter, and the model the hypothesis test holds the
scripts to."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from gateway.admission.plan import Item, Kind


class Gcra:
    """The same algorithm as the scripts, in process: the fail-open limiter, and the tests' model."""

    def __init__(self, clock: Callable[[], int] = lambda: time.time_ns() // 1000):
        self.clock = clock
        self.tat: dict[str, int] = {}
        self.slots: dict[str, dict[str, int]] = {}

    def admit(self, items: tuple[Item, ...], rid: str, ttl_us: int, now: int | None = None) -> tuple[bool, int]:
        now = self.clock() if now is None else now
        new: dict[str, int] = {}
        for i, item in enumerate(items):
            if item.kind == Kind.CONCURRENCY:
                slots = {k: v for k, v in self.slots.get(item.key, {}).items() if v > now}
                self.slots[item.key] = slots
                if len(slots) + item.cost > item.limit:
                    return False, i + 1
            else:
                tat = max(self.tat.get(item.key, now), now)
                new_tat = tat + math.ceil(item.cost * item.emission_us)
                if new_tat - now > item.period_us:
                    return False, i + 1
                new[item.key] = new_tat
        for item in items:
            if item.kind == Kind.CONCURRENCY:
                self.slots[item.key][rid] = now + ttl_us
            else:
                self.tat[item.key] = new[item.key]
        return True, 0

    def settle(self, items: tuple[Item, ...], rid: str, refunds: tuple[int, ...], now: int | None = None) -> None:
        now = self.clock() if now is None else now
        for item, refund in zip(items, refunds, strict=True):
            if item.kind == Kind.CONCURRENCY:
                self.slots.get(item.key, {}).pop(rid, None)
            elif refund:
                tat = max(self.tat.get(item.key, now), now)
                self.tat[item.key] = max(tat - math.floor(refund * item.emission_us), now)
