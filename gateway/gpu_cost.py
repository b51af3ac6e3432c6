"""GPU-hour cost: what the GPUs of the tiers priced by ``gpu_hour`` cost, allocated to tenants by
their use, with the idle part reported apart — the figure finance closes the month on.

For each worker of such a tier and each hour of a day, the worker's **up time** in that hour
(``gateway/uptime.py``: registration to last heartbeat, or a streak of passing health checks) costs
``usd * gpus_per_worker`` per hour. The part of it the worker was **busy** — inside the union of
its requests' ``[arrival, arrival + latency]`` from the ledger — is allocated to tenants in
proportion to their **use** in that hour: ``prompt_tokens + COMPLETION_WEIGHT * completion_tokens``
of their requests on that worker (a request spanning an hour boundary counts in each hour by its
time there). The rest is **idle**: up, nobody's request running (also busy time whose requests
carry no tokens at all, which nobody can be billed for).

Exactness: everything above is computed with ``Fraction`` on integer milliseconds. Per (day, tier)
the total is ``worker-hours * gpus * usd`` rounded once to a micro-dollar (exact when the
worker-hours are whole), and that integer is divided between the tenants and idle by largest
remainder, so allocated + idle equals it exactly — no micro-dollar is lost or invented.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import msgspec

from gateway import ledger_report, uptime
from gateway.ledger import LedgerRecord
from gateway.policy.schema import GpuHour, Policy
from gateway.store import Client

COMPLETION_WEIGHT = 4  # a generated token holds a GPU about as long as a few prompt tokens (prefill is batched)
MICRO = 10**6
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MAX_DAYS = 366
Span = tuple[int, int]  # [start, end) in unix milliseconds


class TierDay(msgspec.Struct, kw_only=True):
    day: str
    tier: str
    usd_per_gpu_hour: Decimal
    gpus_per_worker: int
    worker_ms: int  # up time of all the tier's workers that day
    total_micro: int  # worker-hours x gpus x usd, in micro-dollars (rounded once, half to even)
    idle_micro: int
    tenants: dict[str, int]  # micro-dollars allocated to each tenant

    @property
    def used_micro(self) -> int:
        return sum(self.tenants.values())


def allocate(total: int, parts: dict[str, Fraction]) -> dict[str, int]:
    """Split the integer ``total`` (the rounded sum of ``parts``) by largest remainder: each part gets
    its floor, the units left over go to the largest fractional parts (ties by name)."""
    out = {k: math.floor(v) for k, v in parts.items()}
    left = total - sum(out.values())
    if not 0 <= left <= len(parts):
        raise ValueError(f"{total} is not the rounded sum of the parts")
    for k in sorted(parts, key=lambda k: (out[k] - parts[k], k))[:left]:
        out[k] += 1
    return out


def _overlap(a: list[Span], b: list[Span]) -> list[Span]:
    """Intersection of two sorted lists of disjoint spans."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(spans: list[Span]) -> int:
    return sum(e - s for s, e in spans)


def _merge(spans: list[Span]) -> list[Span]:
    return [(int(s), int(e)) for s, e in uptime.merge([(float(s), float(e)) for s, e in spans])]


class _Use:
    """One (day, tier)'s requests: busy spans per worker and use per (worker, hour, tenant)."""

    def __init__(self) -> None:
        self.busy: dict[str, list[Span]] = {}
        self.use: dict[tuple[str, int], dict[str, Fraction]] = {}

    def add(self, rec: LedgerRecord) -> None:
        start = round(rec.time * 1000)
        end = start + max(0, round(rec.latency_ms))
        weight = Fraction(rec.prompt_tokens + COMPLETION_WEIGHT * rec.completion_tokens)
        self.busy.setdefault(rec.worker, []).append((start, end))
        hour = start - start % HOUR_MS
        while True:  # the weight goes to each hour by the request's time in it
            share = weight if end == start else weight * (min(end, hour + HOUR_MS) - max(start, hour)) / (end - start)
            cell = self.use.setdefault((rec.worker, hour), {})
            cell[rec.tenant] = cell.get(rec.tenant, Fraction(0)) + share
            hour += HOUR_MS
            if hour >= end:
                break


def price_day(day: str, tier: str, price: GpuHour, up: dict[str, list[Span]], use: _Use) -> TierDay:
    """The cost of one tier's workers on one day, allocated (see the module's docstring)."""
    rate = Fraction(price.usd) * MICRO * price.gpus_per_worker / HOUR_MS  # micro-dollars per worker-millisecond
    day_start = int(datetime.datetime.fromisoformat(day).replace(tzinfo=datetime.UTC).timestamp() * 1000)
    shares: dict[str, Fraction] = {}
    idle = Fraction(0)
    worker_ms = 0
    for worker, spans in up.items():
        busy = _merge(use.busy.get(worker, []))
        for hour in range(day_start, day_start + DAY_MS, HOUR_MS):
            active = _overlap(spans, [(hour, hour + HOUR_MS)])
            active_ms = _length(active)
            if not active_ms:
                continue
            worker_ms += active_ms
            busy_ms = _length(_overlap(active, busy))
            weights = use.use.get((worker, hour), {})
            total_weight = sum(weights.values(), Fraction(0))
            if not busy_ms or not total_weight:
                idle += rate * active_ms
                continue
            idle += rate * (active_ms - busy_ms)
            for tenant, w in weights.items():
                shares[tenant] = shares.get(tenant, Fraction(0)) + rate * busy_ms * w / total_weight
    total = round(rate * worker_ms)
    parts = {**{f"t:{t}": v for t, v in shares.items()}, "idle": idle}
    allocated = allocate(total, parts)
    return TierDay(
        day=day,
        tier=tier,
        usd_per_gpu_hour=price.usd,
        gpus_per_worker=price.gpus_per_worker,
        worker_ms=worker_ms,
        total_micro=total,
        idle_micro=allocated.pop("idle"),
        tenants={k[2:]: v for k, v in sorted(allocated.items())},
    )


def _day_list(since: str, until: str) -> list[str]:
    first, last = datetime.date.fromisoformat(since), datetime.date.fromisoformat(until)
    return [(first + datetime.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def _records(client: Client, archive: str | None, since: str, until: str) -> AsyncIterator[LedgerRecord]:
    if archive is None:
        return ledger_report.records(client, since, until)
    from gateway.archive import reader

    return reader.records(client, archive, since, until)


async def report(
    client: Client, policy: Policy, since: str | None, until: str | None, archive: str | None = None
) -> list[TierDay]:
    """Every (day, tier) of the days in [since, until] (default: today, UTC) for the policy's
    tiers priced by ``gpu_hour``."""
    ledger_report.check_day(since, "since")
    ledger_report.check_day(until, "until")
    until = until or since or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    since = since or until
    if since > until:
        raise ledger_report.BadQuery("since", f"since ({since}) is after until ({until})")
    if len(_day_list(since, until)) > MAX_DAYS:  # each day reads every worker's up time: bounded
        raise ledger_report.BadQuery("until", f"at most {MAX_DAYS} days at a time")
    priced = {name: t.gpu_hour for name, t in policy.tiers.items() if t.gpu_hour is not None}
    uses: dict[tuple[str, str], _Use] = {}
    if priced:
        async for rec in _records(client, archive, since, until):
            if rec.tier in priced:
                uses.setdefault((rec.day, rec.tier), _Use()).add(rec)
    out = []
    for day in _day_list(since, until):
        start = datetime.datetime.fromisoformat(day).replace(tzinfo=datetime.UTC).timestamp()
        for tier, price in sorted(priced.items()):
            found = await uptime.intervals(client, tier, start, start + 86_400)
            up = {url: [(round(s * 1000), round(e * 1000)) for s, e in spans] for url, spans in found.items()}
            out.append(price_day(day, tier, price, up, uses.get((day, tier), _Use())))
    return out


def usd(micro: int) -> Decimal:
    return Decimal(micro).scaleb(-6).quantize(Decimal("0.000001"))


def hours(ms: int) -> Decimal:
    return (Decimal(ms) / HOUR_MS).quantize(Decimal("0.001"))


def as_json(days: list[TierDay]) -> list[dict[str, Any]]:
    return [
        {
            "day": d.day,
            "tier": d.tier,
            "worker_hours": str(hours(d.worker_ms)),
            "gpus_per_worker": d.gpus_per_worker,
            "usd_per_gpu_hour": str(d.usd_per_gpu_hour),
            "total_usd": str(usd(d.total_micro)),
            "used_usd": str(usd(d.used_micro)),
            "idle_usd": str(usd(d.idle_micro)),
            "tenants": {t: str(usd(m)) for t, m in d.tenants.items()},
        }
        for d in days
    ]


def render(days: list[TierDay], fmt: str) -> str:
    if fmt == "json":
        return msgspec.json.encode(as_json(days)).decode() + "\n"
    rows = [("day", "tier", "tenant", "cost_usd")]
    for d in days:
        rows += [(d.day, d.tier, t, str(usd(m))) for t, m in d.tenants.items()]
        rows.append((d.day, d.tier, "(idle)", str(usd(d.idle_micro))))
    if fmt == "csv":
        return "".join(",".join(r) + "\n" for r in rows)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    for d in days:
        gpus = f"{d.gpus_per_worker} GPU{'s' if d.gpus_per_worker > 1 else ''}"
        lines.append(
            f"{d.day} {d.tier}: {hours(d.worker_ms)} worker-hours x {gpus} x ${d.usd_per_gpu_hour} = "
            f"${usd(d.total_micro)} = used ${usd(d.used_micro)} + idle ${usd(d.idle_micro)}"
        )
    return "\n".join(lines) + "\n"
