"""Which worker holds which Responses answer: ``GET /v1/responses/{id}`` and its cancel must reach
the worker that made the response (vLLM keeps it in that process's memory).

``remember`` queues (after the response went out — never on the client's path); a background
task writes the queue in one pipelined round trip every few milliseconds, each entry with a TTL,
so any replica can route the follow-up. Entries name the tenant too: another tenant's id is as
unknown as an id never made. ``lookup`` reads this replica's not-yet-written entries first, so a
follow-up that arrives before the write still finds its worker here.

Redis layout:  ``gw:resp:<response id>`` string ``<tenant> <tier> <worker url>``, expiring after the TTL.
"""

from __future__ import annotations

import msgspec
import structlog

from gateway.batching import Wake, flush_when_queued
from gateway.resp import REDIS_ERRORS, Connection

log = structlog.get_logger("gateway.responses")


def key(response_id: str) -> str:
    return f"gw:resp:{response_id}"


class Holder(msgspec.Struct, frozen=True):
    tenant: str
    tier: str
    url: str

    def encode(self) -> str:
        return f"{self.tenant} {self.tier} {self.url}"

    @classmethod
    def decode(cls, raw: str) -> Holder | None:
        parts = raw.split(" ", 2)
        return cls(*parts) if len(parts) == 3 else None


class ResponseIndex:
    def __init__(self, conn: Connection, ttl_s: int, *, batch: int = 256):
        self.conn = conn
        self.ttl_s = ttl_s
        self.batch = batch
        self._queue: dict[str, Holder] = {}
        self._wake = Wake()

    def remember(self, response_id: str, holder: Holder) -> None:
        self._queue[response_id] = holder
        self._wake.queued(len(self._queue), self.batch)

    async def lookup(self, response_id: str) -> Holder | None:
        queued = self._queue.get(response_id)
        if queued is not None:
            return queued
        raw = await self.conn.call("GET", key(response_id))
        if raw is None:
            return None
        return Holder.decode(raw.decode() if isinstance(raw, bytes) else str(raw))

    async def flush(self) -> None:
        batch, self._queue = self._queue, {}
        if not batch:
            return
        commands = [("SET", key(rid), h.encode(), "EX", self.ttl_s) for rid, h in batch.items()]
        try:
            replies = await self.conn.pipeline(commands)
        except REDIS_ERRORS as exc:
            log.warning("response_index_write_failed", responses=len(batch), error=repr(exc))
            return  # GET/cancel of these answers will be 404 on other replicas; nothing is billed wrong
        failed = sum(isinstance(r, BaseException) for r in replies)
        if failed:
            log.warning("response_index_write_failed", responses=failed)

    async def run(self, interval_s: float = 0.01) -> None:
        await flush_when_queued(self._wake, self.flush, interval_s, lambda: bool(self._queue))
