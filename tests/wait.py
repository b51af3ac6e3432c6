"""Waiting for a condition, never for a fixed time: background work (a flush, a cache expiry, a
replica following a policy) is done when its effect shows, and on a loaded machine that may take
longer than any fixed sleep guessed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = "the condition") -> T:
    """Call ``check`` until it returns something truthy, and return that; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s (last: {result!r})")
        time.sleep(interval)
