"""The ledger stage: one record per request that reached a worker, billed exactly once.

``Ledger.record`` queues a ``LedgerRecord`` (after the response, off the client's path); a
background task writes queued records in pipelined batches with ``lua/ledger_write.lua``, which
appends the record to a Redis stream and adds its tokens to per-day aggregates in one atomic step
keyed by request id — writing a record twice changes nothing. If Redis does not answer, the
batch goes to a local append-only spool file (fsync'd) and is replayed, idempotently, when Redis is
back — also after a restart. Shutdown writes (or spools) whatever is queued.

Money is exact: records carry the tier's prices as decimal strings and the cost as a decimal
string; aggregates hold integer token counts per (tenant, tier, route, model, prices), and cost is
computed from them with ``Decimal`` when reported. Cached prompt tokens (served from the worker's
prefix cache) are part of ``prompt_tokens``; when the tier prices them (``cached_input``) the record
carries that price and the group names it, and the aggregate counts them apart, so a report
prices ``input - cached`` at the input price and ``cached`` at the cached price — still exactly.

Redis layout (one hash tag, ``{ledger}``, so it can live on one Cluster slot):

    gw:{ledger}:records          stream   every record, fields as in LedgerRecord
    gw:{ledger}:agg:<YYYY-MM-DD> hash     "<tenant>|<tier>|<route>|<model>|<price in>|<price out>[|<price cached>]|
                                          requests|input|output|cached" (the cached price only when the tier has one;
                                          "cached" only once some tokens were cached)
    gw:{ledger}:tasks:<YYYY-MM-DD> hash   "<tenant>|<task>|<tier>|<route>|<model>|<price in>|<price out>|<price cached>|
                                          <role>|requests|input|output|cached|i<bin>|o<bin>|compared|agree": the same
                                          counters with the task, per-request token histograms (``token_bin``) and,
                                          for shadow calls (role "shadow:<client's tier>"), the comparisons
    gw:{ledger}:days             set      days that have aggregates
    gw:{ledger}:rid:<request id> string   written-marker (expires after MARKER_TTL_S)
"""

from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import structlog

from gateway.batching import Wake, flush_when_queued
from gateway.resp import REDIS_ERRORS, Connection, RedisError, Script, pipeline_script
from gateway.store import lua

log = structlog.get_logger("gateway.ledger")
STREAM = "gw:{ledger}:records"
DAYS = "gw:{ledger}:days"
MARKER_TTL_S = 35 * 24 * 3600  # longer than any spool could wait


def agg_key(day: str) -> str:
    return f"gw:{{ledger}}:agg:{day}"


def tasks_key(day: str) -> str:
    return f"gw:{{ledger}}:tasks:{day}"


def drops_key(day: str) -> str:
    """Shadow samples dropped that day (shadow tier busy or without a worker), by "task|route|tier|reason"."""
    return f"gw:{{ledger}}:shadow-drops:{day}"


SHADOW_TENANT = "(platform)"  # shadow calls are the platform's cost, never a tenant's
SHADOW_OUTCOME = "shadow"
_EXACT_BITS = 8  # token counts below 2**8 = 256 have a bin of their own
_SUB_BITS = 5  # 2**5 = 32 bins per power of two above: a bin is at most 1/32 (~3%) wide


def token_bin(n: int) -> int:
    """The histogram bin of a per-request token count: exact below 256, then 32 bins per power of
    two (log-linear, as HdrHistogram), so a percentile read from the bins is within ~3%."""
    if n < 1 << _EXACT_BITS:
        return max(n, 0)
    e = n.bit_length() - 1
    return (1 << _EXACT_BITS) + ((e - _EXACT_BITS) << _SUB_BITS) + ((n >> (e - _SUB_BITS)) & ((1 << _SUB_BITS) - 1))


def bin_high(b: int) -> int:
    """The largest token count of bin ``b`` (a percentile is reported as its bin's upper end)."""
    if b < 1 << _EXACT_BITS:
        return b
    e, sub = divmod(b - (1 << _EXACT_BITS), 1 << _SUB_BITS)
    e += _EXACT_BITS
    width = 1 << (e - _SUB_BITS)
    return ((1 << _SUB_BITS) + sub) * width + width - 1


def marker_key(request_id: str) -> str:
    return f"gw:{{ledger}}:rid:{request_id}"


class LedgerRecord(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    time: float  # unix seconds, when the request arrived
    tenant: str
    key_id: str
    route: str
    tier: str
    model: str  # the model the worker served
    worker: str
    policy: str  # the policy version the request was served under
    prompt_tokens: int  # as the worker reported them (the estimate when it could not)
    completion_tokens: int
    prompt_tokens_estimate: int  # the gateway's own tiktoken count
    price_input: str  # USD per 1M tokens, exact decimal
    price_output: str
    cost_usd: str  # exact decimal
    outcome: str  # ok | error | partial | client_disconnect
    attempts: int
    ttfb_ms: float | None
    latency_ms: float
    task: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    endpoint: str = "chat"  # Endpoint.label; records written before it existed were all chat or completions
    cached_tokens: int = 0  # of prompt_tokens, served from the worker's prefix cache (0: none reported)
    price_cached_input: str = ""  # USD per 1M cached tokens; "": the tier has no such price (``price_input``)
    # shadow calls (outcome "shadow", tenant "(platform)"): the client's request they copied, the tier
    # that answered the client, and how the two answers compared (no comparison: the shadow failed)
    model_alias: str = ""  # the model the client asked for ("auto", or a route's alias): what routing saw
    shadow_of: str = ""
    primary_tier: str = ""
    comparator: str = ""
    score: float | None = None
    agree: bool | None = None
    queue_wait_ms: float = 0.0  # waited in saturated tiers' gateway queues before a worker took it

    @property
    def day(self) -> str:
        return datetime.datetime.fromtimestamp(self.time, datetime.UTC).strftime("%Y-%m-%d")

    def group(self) -> str:
        parts: tuple[str, ...] = (self.tenant, self.tier, self.route, self.model, self.price_input, self.price_output)
        if self.price_cached_input:  # groups of tiers without a cached price keep their old name
            parts = (*parts, self.price_cached_input)
        return "|".join(quote(p, safe="") for p in parts)

    def task_group(self) -> str:
        role = f"shadow:{self.primary_tier}" if self.shadow_of else ""
        parts = (self.tenant, self.task or "", self.tier, self.route, self.model, self.price_input, self.price_output)
        return "|".join(quote(p, safe="") for p in (*parts, self.price_cached_input, role))


def _fields(rec: LedgerRecord) -> list[str]:
    out: list[str] = []
    for name in rec.__struct_fields__:
        value = getattr(rec, name)
        out += [name, "" if value is None else ("1" if value is True else "0" if value is False else str(value))]
    return out


_TYPES = {
    "time": float,
    "prompt_tokens": int,
    "completion_tokens": int,
    "prompt_tokens_estimate": int,
    "attempts": int,
    "ttfb_ms": float,
    "latency_ms": float,
    "max_tokens": int,
    "cached_tokens": int,
    "score": float,
    "queue_wait_ms": float,
}
_DEFAULTED = frozenset(  # fields added later
    {
        "endpoint",
        "cached_tokens",
        "price_cached_input",
        "model_alias",
        "shadow_of",
        "primary_tier",
        "comparator",
        "queue_wait_ms",
    }
)


def from_fields(fields: dict[str, str]) -> LedgerRecord:
    values: dict[str, Any] = {}
    for name in LedgerRecord.__struct_fields__:
        raw = fields.get(name, "")
        if name == "stream":
            values[name] = raw == "1"
        elif name == "agree":
            values[name] = None if raw == "" else raw == "1"
        elif raw == "" and name in ("ttfb_ms", "max_tokens", "task", "score"):
            values[name] = None
        elif raw == "" and name in _DEFAULTED:
            continue  # a record from before the field: its default
        else:
            values[name] = _TYPES.get(name, str)(raw)
    return LedgerRecord(**values)


class Ledger:
    """``wait_replicas`` > 0: a batch counts as written only once that many replicas have it (``WAIT``
    after the batch, on its connection, for at most ``wait_ms``); else it is spooled as well and
    replayed later — idempotently, since the primary has it. Replication is asynchronous, so without
    this a primary that dies just after answering can take records with it (its replica is promoted
    without them). ``WAIT`` holds its connection: give the ledger one of its own."""

    def __init__(
        self, conn: Connection, spool_dir: str, *, batch: int = 512, wait_replicas: int = 0, wait_ms: int = 100
    ):
        self.conn = conn
        self.wait = ("WAIT", wait_replicas, wait_ms) if wait_replicas else None
        self.script = Script(lua("ledger_write"))
        self.spool = Path(spool_dir) / "ledger.spool.jsonl"
        self.batch = batch
        self._queue: list[LedgerRecord] = []
        self._wake = Wake()
        self._lock = asyncio.Lock()

    def record(self, rec: LedgerRecord) -> None:
        self._queue.append(rec)
        self._wake.queued(len(self._queue), self.batch)

    def _command(self, rec: LedgerRecord) -> tuple[str | int, ...]:
        day = rec.day
        keys: tuple[str, ...] = (marker_key(rec.request_id), STREAM, agg_key(day), DAYS, tasks_key(day))
        args: tuple[str | int, ...] = (
            MARKER_TTL_S,
            rec.group(),
            rec.prompt_tokens,
            rec.completion_tokens,
            rec.cached_tokens,
            day,
            rec.task_group(),
            token_bin(rec.prompt_tokens),
            token_bin(rec.completion_tokens),
            0 if rec.agree is None else 1,
            1 if rec.agree else 0,
        )
        return ("EVALSHA", self.script.sha, len(keys), *keys, *args, *_fields(rec))

    async def write(self, records: list[LedgerRecord]) -> int:
        """Write records to Redis; returns how many were new. Raises on a Redis failure."""
        if not records:
            return 0
        commands: list[tuple[str | int, ...]] = [self._command(r) for r in records]
        if self.wait is not None:
            commands.append(self.wait)  # on the same connection as the batch (a cluster: the ledger's primary)
        # idempotent: on NOSCRIPT the ones that went through count 0 when sent again
        replies = await pipeline_script(self.conn, self.script, commands)
        for r in replies:
            if isinstance(r, BaseException):
                raise RedisError(f"ledger write failed: {r}")
        if self.wait is not None:
            acked = int(replies.pop())
            if acked < self.wait[1]:
                raise RedisError(f"ledger batch written, but only {acked} of {self.wait[1]} replicas have it")
        return sum(int(r) for r in replies)

    def _to_spool(self, records: list[LedgerRecord]) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with self.spool.open("ab") as f:
            f.write(b"".join(msgspec.json.encode(r) + b"\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    async def flush(self) -> int:
        """Write what is queued; on a Redis failure, spool it. Then replay the spool if any."""
        async with self._lock:
            batch, self._queue = self._queue, []
            if batch:
                try:
                    await self.write(batch)
                except REDIS_ERRORS as exc:
                    await asyncio.to_thread(self._to_spool, batch)
                    log.warning("ledger_spooled", records=len(batch), spool=str(self.spool), error=repr(exc))
                    return 0
            await self._replay()
            return len(batch)

    async def _replay(self) -> None:
        replaying = self.spool.with_suffix(".replaying")
        if not replaying.exists():
            if not self.spool.exists():
                return
            self.spool.rename(replaying)  # new spooling goes to a fresh file meanwhile
        data = await asyncio.to_thread(replaying.read_bytes)
        records = [msgspec.json.decode(line, type=LedgerRecord) for line in data.splitlines() if line.strip()]
        try:
            written = 0
            for i in range(0, len(records), self.batch):
                written += await self.write(records[i : i + self.batch])
        except REDIS_ERRORS:
            return  # still away: the file stays and is replayed next time
        replaying.unlink()
        log.info("ledger_spool_replayed", records=len(records), new=written)

    def _pending(self) -> bool:
        """Records queued, or a spool to replay (Redis was away): keep flushing."""
        return bool(self._queue) or self.spool.exists() or self.spool.with_suffix(".replaying").exists()

    async def run(self, interval_s: float = 0.05) -> None:
        await flush_when_queued(self._wake, self.flush, interval_s, self._pending)
