"""Reading the ledger: reports from the aggregates, exports from the stream, and verification.

Reports read only the per-day aggregates (a handful of counters per tenant, tier, route and day),
so they take the same time over a thousand records or a hundred million. Exports page through the
stream ``PAGE`` records at a time and yield them one by one: constant memory. ``verify`` re-adds
every record of the stream and compares the sums with the aggregates, exactly.
"""

from __future__ import annotations

import csv
import datetime
import io
import re
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal, localcontext
from typing import Any
from urllib.parse import unquote

import msgspec

from gateway.ledger import DAYS, STREAM, LedgerRecord, agg_key, from_fields
from gateway.policy.schema import Price, canonical
from gateway.store import Client

GROUPS = ("day", "tenant", "tier", "route", "model")
PAGE = 5000
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class BadQuery(ValueError):
    """A report's parameter is malformed; ``param`` names it (``since``, ``until``, ``group_by``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_day(value: str | None, param: str) -> None:
    """Days are ``YYYY-MM-DD``; anything else is refused rather than silently matching nothing."""
    if value is None:
        return
    try:
        if not _DAY.fullmatch(value):
            raise ValueError
        datetime.date.fromisoformat(value)
    except ValueError:
        raise BadQuery(param, f"{param} must be a day as YYYY-MM-DD, not {value!r}") from None


class Row(msgspec.Struct):
    requests: int = 0
    input_tokens: int = 0  # cached ones included
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    cached_tokens: int = 0  # of input_tokens, served from the workers' prefix caches


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _days(since: str | None, until: str | None, known: Iterable[str]) -> list[str]:
    return sorted(d for d in known if (since is None or d >= since) and (until is None or d <= until))


async def aggregates(client: Client, since: str | None = None, until: str | None = None) -> dict[tuple[str, ...], Row]:
    """(day, tenant, tier, route, model, price in, price out, price cached) → counters, for days in
    [since, until]; price cached is "" for groups of tiers that price cached tokens as input."""
    out: dict[tuple[str, ...], Row] = {}
    days = _days(since, until, [_text(d) for d in await client.smembers(DAYS)])
    for day in days:
        raw = await client.hgetall(agg_key(day))
        for field, value in raw.items():
            *group, kind = _text(field).split("|")
            if len(group) == 6:
                group.append("")  # no cached price: cached tokens are billed as input
            key = (day, *(unquote(g) for g in group))
            row = out.setdefault(key, Row())
            if kind == "requests":
                row.requests += int(value)
            elif kind == "input":
                row.input_tokens += int(value)
            elif kind == "output":
                row.output_tokens += int(value)
            elif kind == "cached":
                row.cached_tokens += int(value)
    return price(out)


def price(rows: dict[tuple[str, ...], Row]) -> dict[tuple[str, ...], Row]:
    """Set each group's exact cost from its counters and its prices (the key's last three parts)."""
    for (*_, price_in, price_out, price_cached), row in rows.items():
        cached_price = Decimal(price_cached) if price_cached else None
        tier_price = Price(Decimal(price_in), Decimal(price_out), cached_input=cached_price)
        row.cost_usd = tier_price.cost(row.input_tokens, row.output_tokens, row.cached_tokens)
    return rows


def group_key(rec: LedgerRecord) -> tuple[str, ...]:
    """The key of ``aggregates`` a record counts under."""
    return (
        rec.day,
        rec.tenant,
        rec.tier,
        rec.route,
        rec.model,
        rec.price_input,
        rec.price_output,
        rec.price_cached_input,
    )


async def report(
    client: Client,
    group_by: list[str],
    since: str | None = None,
    until: str | None = None,
    archive: str | None = None,
) -> list[dict[str, Any]]:
    """``archive``: a Postgres URL, to read the ledger's archive beside Redis (``gateway.archive``)."""
    for g in group_by:
        if g not in GROUPS:
            raise BadQuery("group_by", f"cannot group by {g!r}: use {', '.join(GROUPS)}")
    check_day(since, "since")
    check_day(until, "until")
    grouped: dict[tuple[str, ...], Row] = {}
    if archive is None:
        rows = await aggregates(client, since, until)
    else:
        from gateway.archive import reader  # psycopg only for those who archive

        rows = await reader.aggregates(client, archive, since, until, group_by)
    with localcontext(prec=60):  # exact sums of exact costs
        for (day, tenant, tier, route, model, _, _, _), row in rows.items():
            names = {"day": day, "tenant": tenant, "tier": tier, "route": route, "model": model}
            acc = grouped.setdefault(tuple(names[g] for g in group_by), Row())
            acc.requests += row.requests
            acc.input_tokens += row.input_tokens
            acc.output_tokens += row.output_tokens
            acc.cached_tokens += row.cached_tokens
            acc.cost_usd += row.cost_usd
    for row in grouped.values():
        row.cost_usd = canonical(row.cost_usd)
    return [
        {**dict(zip(group_by, key, strict=True)), **msgspec.structs.asdict(row)} for key, row in sorted(grouped.items())
    ]


def render(rows: list[dict[str, Any]], group_by: list[str], fmt: str) -> str:
    columns = [*group_by, "requests", "input_tokens", "output_tokens", "cost_usd"]
    if fmt == "json":
        return msgspec.json.encode(rows, enc_hook=str).decode() + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([r[c] for c in columns])
        return buf.getvalue()
    widths = (
        [max(len(c), *(len(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])) for r in rows)) for c in columns]
        if rows
        else [len(c) for c in columns]
    )

    def cell(v: Any, w: int) -> str:
        return f"{v:>{w},}" if isinstance(v, int) else (f"{v!s:>{w}}" if isinstance(v, Decimal) else f"{v!s:<{w}}")

    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell(r[c], w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    total = Row(
        sum(r["requests"] for r in rows),
        sum(r["input_tokens"] for r in rows),
        sum(r["output_tokens"] for r in rows),
        sum((r["cost_usd"] for r in rows), Decimal(0)),
    )
    lines.append(
        f"total: {total.requests:,} requests, {total.input_tokens:,} input and {total.output_tokens:,} "
        f"output tokens, ${canonical(total.cost_usd)}"
    )
    return "\n".join(lines) + "\n"


def _start_id(since: str | None) -> str:
    if since is None:
        return "-"
    # stream ids are write times: a record is written after its request, never before
    t = datetime.datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    return str(int(t.timestamp() * 1000))


def _sid(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


async def records(
    client: Client,
    since: str | None = None,
    until: str | None = None,
    *,
    after: str | None = None,
    upto: str | None = None,
) -> AsyncIterator[LedgerRecord]:
    """Every record whose request arrived on a day in [since, until], in write order, page by page;
    only stream ids above ``after`` and up to ``upto`` if given (the archive's boundary)."""
    check_day(since, "since")
    check_day(until, "until")
    start = _start_id(since)
    if after is not None and (start == "-" or _sid(after) >= _sid(start)):
        start = f"({after}"
    while True:
        page: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(  # type: ignore[assignment]
            STREAM, min=start, max=upto or "+", count=PAGE
        )
        if not page:
            return
        for _, fields in page:
            rec = from_fields({_text(k): _text(v) for k, v in fields.items()})
            day = rec.day
            if (since is None or day >= since) and (until is None or day <= until):
                yield rec
        last = _text(page[-1][0])
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"


async def verify(client: Client) -> list[str]:
    """Differences between the sum of the records and the aggregates (empty when they agree)."""
    summed: dict[tuple[str, ...], Row] = {}
    seen: set[str] = set()
    problems: list[str] = []
    async for rec in records(client):
        if rec.request_id in seen:
            problems.append(f"request {rec.request_id} is recorded twice")
        seen.add(rec.request_id)
        row = summed.setdefault(group_key(rec), Row())
        row.requests += 1
        row.input_tokens += rec.prompt_tokens
        row.output_tokens += rec.completion_tokens
        row.cached_tokens += rec.cached_tokens
    stored = await aggregates(client)
    for key in sorted(set(summed) | set(stored)):
        a, b = summed.get(key, Row()), stored.get(key, Row())
        summed_row = (a.requests, a.input_tokens, a.output_tokens, a.cached_tokens)
        stored_row = (b.requests, b.input_tokens, b.output_tokens, b.cached_tokens)
        if summed_row != stored_row:
            cached = a.cached_tokens or b.cached_tokens
            problems.append(
                f"{'/'.join(key[:5])}: records sum to {a.requests} requests, {a.input_tokens} in, "
                f"{a.output_tokens} out{f', {a.cached_tokens} cached' if cached else ''}; aggregates say "
                f"{b.requests}, {b.input_tokens}, {b.output_tokens}{f', {b.cached_tokens}' if cached else ''}"
            )
    return problems
