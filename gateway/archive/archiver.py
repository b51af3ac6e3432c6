"""Copy the ledger stream into Postgres, exactly once by request id, then trim what Postgres holds.

One batch at a time, in stream order, from just after the last trimmed id (``gw:{ledger}:archived``):

1. read up to ``batch`` records (stopping at the first one of a day not before ``before``);
2. in one Postgres transaction: COPY them into a temporary table, ``INSERT … ON CONFLICT
   (request_id) DO NOTHING`` into ``ledger_records``, add only the rows actually inserted to
   ``ledger_rollup``, and advance ``ledger_archive_state`` to the batch's last stream id; commit;
3. in one Redis script (``lua/ledger_trim.lua``): if the last trimmed id is still the one read in
   step 1, subtract the batch's tokens from the day aggregates, ``XTRIM MINID`` past it and record
   the new last trimmed id.

A crash between 2 and 3 leaves the batch in both stores; the next run reads the same batch, step 2
inserts nothing (every request id is there) and step 3 trims it — nothing lost, nothing twice.
Readers (``reader``) count a record in Postgres iff its stream id is at or below
``ledger_archive_state``, and hold a shared advisory lock while they read; step 3 takes it
exclusively, so the Redis side of a read cannot change under it. Only one archiver runs at a time
(another advisory lock). Nothing here is on the request path: the gateway's sink runs it in a
thread with its own event loop and connections.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import psycopg
import structlog

from gateway.archive import ArchiveUnavailable
from gateway.archive.schema import migrate
from gateway.ledger import DAYS, STREAM, LedgerRecord, agg_key, from_fields
from gateway.store import Client, script

log = structlog.get_logger("gateway.archive")
ARCHIVED = "gw:{ledger}:archived"
RUN_LOCK = 0x6C65_6467_0002  # one archiver at a time
READ_LOCK = 0x6C65_6467_0003  # readers shared; the trim exclusive
COLUMNS = ("stream_ms", "stream_seq", "day", *LedgerRecord.__struct_fields__)
StreamId = tuple[int, int]


class Busy(RuntimeError):
    """Another archiver holds the run lock."""


class Progress(msgspec.Struct):
    read: int = 0  # records copied to Postgres (again, after a crash)
    new: int = 0  # of them, not there before
    trimmed: int = 0  # records removed from the Redis stream
    last_id: str = "0-0"  # the last stream id trimmed
    deferred: bool = False  # a reader held the lock too long: the last batch is copied, its trim waits


def parse_id(value: bytes | str) -> StreamId:
    ms, _, seq = (value.decode() if isinstance(value, bytes) else value).partition("-")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    """A Postgres connection (autocommit; transactions are explicit) with the schema up to date."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
    try:
        await migrate(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def acknowledged(conn: psycopg.AsyncConnection[Any]) -> StreamId:
    """The last stream id Postgres holds (every record at or below it is archived)."""
    cur = await conn.execute("SELECT last_ms, last_seq FROM ledger_archive_state")
    row = await cur.fetchone()
    assert row is not None  # the migration inserts it
    return int(row[0]), int(row[1])


Batch = list[tuple[StreamId, LedgerRecord]]


class Archiver:
    def __init__(self, client: Client, conn: psycopg.AsyncConnection[Any], *, batch: int = 5000):
        self.client = client
        self.conn = conn
        self.batch = batch
        self.trim_script = script(client, "ledger_trim")

    async def trimmed(self) -> StreamId:
        raw = await self.client.get(ARCHIVED)
        return parse_id(raw) if raw else (0, 0)

    async def read_batch(self, after: StreamId, before: str | None) -> Batch:
        page: list[tuple[bytes, dict[bytes, bytes]]] = await self.client.xrange(  # type: ignore[assignment]
            STREAM, min=f"({format_id(after)}", max="+", count=self.batch
        )
        out: Batch = []
        for sid, fields in page:
            rec = from_fields({k.decode(): v.decode() for k, v in fields.items()})
            if before is not None and rec.day >= before:
                break  # the stream is archived as a prefix: later records wait for their day
            out.append((parse_id(sid), rec))
        return out

    async def copy(self, batch: Batch) -> int:
        """Step 2: returns how many of the batch's records were new to Postgres."""
        last = batch[-1][0]
        async with self.conn.transaction():
            await self.conn.execute("CREATE TEMP TABLE incoming (LIKE ledger_records) ON COMMIT DROP")
            async with self.conn.cursor() as cur:
                async with cur.copy(f"COPY incoming ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    for sid, rec in batch:
                        await copy.write_row((sid[0], sid[1], rec.day, *msgspec.structs.astuple(rec)))
                await cur.execute(_INSERT)
                row = await cur.fetchone()
                await cur.execute(
                    "UPDATE ledger_archive_state SET last_ms = %s, last_seq = %s WHERE (last_ms, last_seq) < (%s, %s)",
                    (*last, *last),
                )
        return int(row[0]) if row else 0

    async def trim(self, batch: Batch, after: StreamId, wait_s: float = 5.0) -> bool:
        """Step 3; False if readers held the lock for ``wait_s`` (the batch stays, trimmed next time)."""
        deadline = time.monotonic() + wait_s
        while True:
            cur = await self.conn.execute("SELECT pg_try_advisory_lock(%s)", (READ_LOCK,))
            got = await cur.fetchone()
            if got and got[0]:
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        try:
            groups: dict[tuple[str, str], list[int]] = {}
            for _, rec in batch:
                acc = groups.setdefault((rec.day, rec.group()), [0, 0, 0, 0])
                acc[0] += 1
                acc[1] += rec.prompt_tokens
                acc[2] += rec.completion_tokens
                acc[3] += rec.cached_tokens
            days = sorted({day for day, _ in groups})
            keys = [STREAM, ARCHIVED, DAYS, *(agg_key(d) for d in days)]
            args: list[str | int] = [format_id(after), format_id(batch[-1][0]), format_id(_next(batch[-1][0]))]
            for (day, group), (n, prompt, completion, cached) in groups.items():
                args += [4 + days.index(day), day, group, n, prompt, completion, cached]
            await self.trim_script(keys=keys, args=args)
        finally:
            await self.conn.execute("SELECT pg_advisory_unlock(%s)", (READ_LOCK,))
        return True

    async def run(self, before: str | None, on_batch: Callable[[Progress], Awaitable[None]] | None = None) -> Progress:
        """Archive every record of a day before ``before`` (all of them if None)."""
        cur = await self.conn.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK,))
        got = await cur.fetchone()
        if not (got and got[0]):
            raise Busy("another archiver is running")
        progress = Progress()
        try:
            while True:
                after = await self.trimmed()
                progress.last_id = format_id(after)
                batch = await self.read_batch(after, before)
                if not batch:
                    return progress
                progress.new += await self.copy(batch)
                progress.read += len(batch)
                if not await self.trim(batch, after):
                    progress.deferred = True
                    return progress
                progress.trimmed += len(batch)
                progress.last_id = format_id(batch[-1][0])
                if on_batch is not None:
                    await on_batch(progress)
        finally:
            await self.conn.execute("SELECT pg_advisory_unlock(%s)", (RUN_LOCK,))


def _next(sid: StreamId) -> StreamId:
    return sid[0], sid[1] + 1


_GROUP = "day, tenant, tier, route, model, price_input, price_output, price_cached_input"
_INSERT = f"""
WITH new AS (
    INSERT INTO ledger_records SELECT * FROM incoming ON CONFLICT (request_id) DO NOTHING
    RETURNING {_GROUP}, prompt_tokens, completion_tokens, cached_tokens
), rolled AS (
    INSERT INTO ledger_rollup
    SELECT {_GROUP}, count(*), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
    FROM new GROUP BY {_GROUP}
    ON CONFLICT ({_GROUP}) DO UPDATE SET
        requests = ledger_rollup.requests + EXCLUDED.requests,
        input_tokens = ledger_rollup.input_tokens + EXCLUDED.input_tokens,
        output_tokens = ledger_rollup.output_tokens + EXCLUDED.output_tokens,
        cached_tokens = ledger_rollup.cached_tokens + EXCLUDED.cached_tokens
    RETURNING 1
)
SELECT count(*) FROM new
"""


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


async def archive(client: Client, pg_url: str, before: str | None, batch: int = 5000) -> Progress:
    try:
        conn = await connect(pg_url)
        try:
            return await Archiver(client, conn, batch=batch).run(before)
        finally:
            await conn.close()
    except psycopg.Error as exc:
        raise ArchiveUnavailable(str(exc).strip()) from exc
