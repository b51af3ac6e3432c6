"""The gateway's background archiver (``GATEWAY_LEDGER_ARCHIVE_URL``): every
``GATEWAY_LEDGER_ARCHIVE_INTERVAL_S`` it archives the records of days before today.

Never on the request path: each run happens in a worker thread with its own event loop and its own
Redis and Postgres connections, in batches; a stop request is honoured between batches (a batch is
always copied and trimmed whole, or left for the next run). Several replicas may run it: one
archives, the others find the run lock taken and skip that round.
"""

from __future__ import annotations

import asyncio
import threading

import psycopg
import redis.exceptions
import structlog

from gateway import store
from gateway.archive import ArchiveUnavailable
from gateway.archive.archiver import Archiver, Busy, Progress, connect, today
from gateway.settings import Settings

log = structlog.get_logger("gateway.archive")


class _Stopped(Exception):
    pass


async def _once(settings: Settings, url: str, stop: threading.Event) -> Progress:
    async def check(_: Progress) -> None:
        if stop.is_set():
            raise _Stopped

    client = store.connect(settings.redis_url, timeout_s=10)
    try:
        conn = await connect(url)
        try:
            return await Archiver(client, conn, batch=2000).run(today(), on_batch=check)
        finally:
            await conn.close()
    except psycopg.Error as exc:
        raise ArchiveUnavailable(str(exc).strip()) from exc
    finally:
        await client.aclose()


async def run(settings: Settings) -> None:
    url = settings.ledger_archive_url
    assert url is not None
    stop = threading.Event()
    try:
        while True:
            await asyncio.sleep(settings.ledger_archive_interval_s)
            try:
                p = await asyncio.to_thread(asyncio.run, _once(settings, url, stop))
            except Busy:
                continue
            except _Stopped:
                return
            except (ArchiveUnavailable, redis.exceptions.RedisError, OSError) as exc:
                log.warning("ledger_archive_failed", error=str(exc))
                continue
            except Exception:  # a bug must not end archiving for the life of the process
                log.exception("ledger_archive_failed")
                continue
            if p.read:
                log.info("ledger_archived", records=p.read, new=p.new, trimmed=p.trimmed, last_id=p.last_id)
    finally:
        stop.set()  # a run under way stops after its current batch
