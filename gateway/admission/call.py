"""The admission call on the wire: a request shape's EVALSHA of ``admit.lua`` encoded once in RESP
(holes for the reservation id, the token cost, the deadline), and the clock that sets deadlines."""

from __future__ import annotations

from gateway.admission.plan import Item, Kind
from gateway.resp import bulk


class AdmitCall:
    """A request shape's admission call, encoded once: items, and the RESP bytes of EVALSHA with
    holes for what changes per request (the reservation id and the token cost)."""

    __slots__ = ("evalsha", "head", "items", "keys", "requests", "slots", "tail", "token_slots", "tokens", "tpm_cap")

    def __init__(self, items: tuple[Item, ...], sha: str, ttl_us: int):
        self.items = items  # token items carry cost 0 here: the cost is the Admission's reserved_tokens
        self.requests = [i for i, item in enumerate(items) if item.kind == Kind.REQUESTS]
        self.tokens = [i for i, item in enumerate(items) if item.kind == Kind.TOKENS]
        self.slots = any(item.kind == Kind.CONCURRENCY for item in items)
        # the most tokens one request can ever be granted: the smallest tokens-per-minute limit
        self.tpm_cap = min((item.limit for item in items if item.kind == Kind.TOKENS), default=None)
        n_args = 3 + len(items) + 2 + 4 * len(items) + 1
        self.evalsha = bulk("EVALSHA") + bulk(sha)
        self.keys = b"".join(bulk(i.key) for i in items)
        self.head = b"*%d\r\n" % n_args + self.evalsha + bulk(len(items)) + self.keys
        # after the reservation id: ttl, then kind, limit, period, cost per item
        self.tail: list[bytes] = [bulk(ttl_us)]
        self.token_slots: list[int] = []
        for item in items:
            self.tail.append(bulk(item.kind) + bulk(item.limit) + bulk(item.period_us))
            if item.kind == Kind.TOKENS:
                self.token_slots.append(len(self.tail))
                self.tail.append(b"")
            else:
                self.tail.append(bulk(item.cost))

    def payload(self, rid: str, tokens: int, deadline_us: int, extra: tuple[Item, ...] = ()) -> bytes:
        """The call for one request; ``extra`` items (a tenant's budget counters, whose cost and
        period change per request) follow the shape's own."""
        parts = self.tail.copy()
        cost = bulk(tokens)
        for i in self.token_slots:
            parts[i] = cost
        head = self.head
        if extra:
            n = len(self.items) + len(extra)
            head = b"*%d\r\n" % (6 + 5 * n) + self.evalsha + bulk(n) + self.keys
            head += b"".join(bulk(i.key) for i in extra)
            parts += [bulk(i.kind) + bulk(i.limit) + bulk(i.period_us) + bulk(i.cost) for i in extra]
        return head + bulk(rid) + b"".join(parts) + bulk(deadline_us)


class RedisClock:
    """This process's clock translated to Redis's, for admission deadlines.

    Each admission reply carries Redis's time when the script ran; minus our time when the call
    was sent, that is the clock offset plus the call's delay, never less than the offset. The
    smallest such sample over the last minute or two is therefore a slight over-estimate, which errs
    towards a later deadline: an admission is never refused for a wrong clock, at worst a late one
    reserves and is released by its late reply."""

    WINDOW_US = 60_000_000

    def __init__(self) -> None:
        self.best: int | None = None  # smallest sample of this window
        self.previous: int | None = None  # of the window before
        self.window_ends = 0

    def observe(self, redis_now_us: int, sent_us: int) -> None:
        sample = redis_now_us - sent_us
        if sent_us > self.window_ends:
            self.previous, self.best, self.window_ends = self.best, None, sent_us + self.WINDOW_US
        if self.best is None or sample < self.best:
            self.best = sample

    def deadline(self, sent_us: int, timeout_us: int) -> int:
        """When, on Redis's clock, a call sent at ``sent_us`` is abandoned; 0 (none) until known."""
        known = [x for x in (self.best, self.previous) if x is not None]
        return sent_us + min(known) + timeout_us if known else 0
