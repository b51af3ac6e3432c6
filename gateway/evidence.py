"""Evidence for tiering, from the ledger: the per-task profile and the shadow agreement.

Reads the per-day task aggregates (``gw:{ledger}:tasks:<day>``, written with every record by
``lua/ledger_write.lua``) — never the records — so it takes the same time over a day or a year:

- **profile** (``--group-by task``, with any of day, tenant, tier, route, model): requests, input
  and output tokens with their mean and p95 per request (p95 from the aggregates' log-linear
  histograms: exact below 64 tokens, within ~3% above), cost and share of the cost;
- **agreement** (``--group-by task,tier``): for each task and the tier that served it, the shadow
  comparisons recorded against another tier — sample size, agreement rate with its 95% Wilson
  score interval — and what moving that traffic to the shadow tier would have saved, re-pricing
  the recorded tokens at the shadow tier's price (as ``policy simulate`` does).

Only client traffic is profiled; shadow calls (tenant ``(platform)``) are summed apart.
"""

from __future__ import annotations

import math
from collections import Counter
from decimal import Decimal, localcontext
from typing import Any
from urllib.parse import unquote

import msgspec

from gateway.ledger import DAYS, bin_high, drops_key, tasks_key
from gateway.ledger_report import BadQuery, _days, _text, check_day
from gateway.policy.schema import Price
from gateway.store import Client

TASK_GROUPS = ("day", "tenant", "task", "tier", "route", "model")
NO_TASK = "(none)"
Z95 = 1.959963984540054  # two-sided 95%


def wilson(agree: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``agree / n`` (0, 1 when n is 0): unlike the
    normal approximation it stays inside [0, 1] and is honest for small samples and rates near 1."""
    if n <= 0:
        return 0.0, 1.0
    p = agree / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class Group(msgspec.Struct):
    """Counters of one (day, tenant, task, tier, route, model, prices, role)."""

    requests: int = 0
    input: int = 0
    output: int = 0
    cached: int = 0
    compared: int = 0
    agree: int = 0
    input_bins: Counter[int] = msgspec.field(default_factory=Counter)
    output_bins: Counter[int] = msgspec.field(default_factory=Counter)

    def add(self, other: Group) -> None:
        self.requests += other.requests
        self.input += other.input
        self.output += other.output
        self.cached += other.cached
        self.compared += other.compared
        self.agree += other.agree
        self.input_bins.update(other.input_bins)
        self.output_bins.update(other.output_bins)


class Key(msgspec.Struct, frozen=True):
    day: str
    tenant: str
    task: str
    tier: str
    route: str
    model: str
    price_in: str
    price_out: str
    price_cached: str
    role: str  # "" client traffic; "shadow:<tier that answered the client>"

    def cost(self, g: Group, price_in: str | None = None, price_out: str | None = None) -> Decimal:
        cached_price = Decimal(self.price_cached) if self.price_cached and price_in is None else None
        price = Price(
            Decimal(price_in or self.price_in), Decimal(price_out or self.price_out), cached_input=cached_price
        )
        return price.cost(g.input, g.output, g.cached)


async def groups(client: Client, since: str | None, until: str | None) -> dict[Key, Group]:
    out: dict[Key, Group] = {}
    days = _days(since, until, [_text(d) for d in await client.smembers(DAYS)])
    for day in days:
        raw = await client.hgetall(tasks_key(day))
        for field, value in raw.items():
            *parts, kind = _text(field).split("|")
            if len(parts) != 9:
                continue
            key = Key(day, *(unquote(p) for p in parts))
            g = out.setdefault(key, Group())
            n = int(value)
            if kind in ("requests", "input", "output", "cached", "compared", "agree"):
                setattr(g, kind, getattr(g, kind) + n)
            elif kind[:1] == "i" and kind[1:].isdigit():
                g.input_bins[int(kind[1:])] += n
            elif kind[:1] == "o" and kind[1:].isdigit():
                g.output_bins[int(kind[1:])] += n
    return out


async def drops(client: Client, since: str | None, until: str | None) -> Counter[tuple[str, str]]:
    """Shadow samples dropped (busy, no worker) per (task, route)."""
    out: Counter[tuple[str, str]] = Counter()
    days = _days(since, until, [_text(d) for d in await client.smembers(DAYS)])
    for day in days:
        for field, value in (await client.hgetall(drops_key(day))).items():
            task, route, *_ = _text(field).split("|")
            out[(task or NO_TASK, route)] += int(value)
    return out


def percentile(bins: Counter[int], q: float) -> int:
    total = sum(bins.values())
    if not total:
        return 0
    rank = math.ceil(q * total)
    seen = 0
    for b in sorted(bins):
        seen += bins[b]
        if seen >= rank:
            return bin_high(b)
    return bin_high(max(bins))


def _names(k: Key) -> dict[str, str]:
    return {"day": k.day, "tenant": k.tenant, "task": k.task or NO_TASK, "tier": k.tier, "route": k.route}


class Shadowed(msgspec.Struct):
    """Comparisons against one shadow tier, and the served traffic re-priced at its price."""

    tier: str
    samples: int = 0
    agree: int = 0
    price_in: str = ""
    price_out: str = ""
    last_day: str = ""


def check_groups(group_by: list[str]) -> None:
    for g in group_by:
        if g not in TASK_GROUPS:
            raise BadQuery("group_by", f"cannot group by {g!r}: use {', '.join(TASK_GROUPS)}")


async def task_report(
    client: Client, group_by: list[str], since: str | None = None, until: str | None = None
) -> dict[str, Any]:
    """Rows per group of client traffic (``task`` among the groups), the shadow traffic apart; with
    ``tier`` among the groups, each row also carries its shadow comparisons and the saving."""
    check_groups(group_by)
    check_day(since, "since")
    check_day(until, "until")
    data = await groups(client, since, until)
    dropped = await drops(client, since, until)
    with localcontext(prec=60):
        return _build(data, dropped, group_by)


def _build(data: dict[Key, Group], dropped: Counter[tuple[str, str]], group_by: list[str]) -> dict[str, Any]:
    served: dict[tuple[str, ...], tuple[Group, Decimal, set[str]]] = {}
    members: dict[tuple[str, ...], list[tuple[Key, Group]]] = {}
    shadow_rows: dict[tuple[str, str], dict[str, Any]] = {}
    shadows: dict[tuple[str, str], dict[str, Shadowed]] = {}  # (task, client's tier) -> shadow tier ->
    for k, g in data.items():
        if k.role:
            primary = k.role.removeprefix("shadow:")
            srow = shadow_rows.setdefault(
                (k.task or NO_TASK, k.tier),
                {"task": k.task or NO_TASK, "tier": k.tier, "requests": 0, "compared": 0, "cost_usd": Decimal(0)},
            )
            srow["requests"] += g.requests
            srow["compared"] += g.compared
            srow["cost_usd"] += k.cost(g)
            s = shadows.setdefault((k.task or NO_TASK, primary), {}).setdefault(k.tier, Shadowed(k.tier))
            s.samples += g.compared
            s.agree += g.agree
            if k.day >= s.last_day:
                s.price_in, s.price_out, s.last_day = k.price_in, k.price_out, k.day
            continue
        names = {**_names(k), "model": k.model}
        key = tuple(names[x] for x in group_by)
        acc, spent, days = served.get(key, (Group(), Decimal(0), set()))
        acc.add(g)
        days.add(k.day)
        served[key] = (acc, spent + k.cost(g), days)
        members.setdefault(key, []).append((k, g))
    total_cost = sum((v[1] for v in served.values()), Decimal(0))
    rows = []
    for key in sorted(served):
        g, spent, days = served[key]
        row: dict[str, Any] = dict(zip(group_by, key, strict=True))
        row.update(
            requests=g.requests,
            input_tokens=g.input,
            output_tokens=g.output,
            mean_input=round(g.input / g.requests, 1) if g.requests else 0.0,
            p95_input=percentile(g.input_bins, 0.95),
            mean_output=round(g.output / g.requests, 1) if g.requests else 0.0,
            p95_output=percentile(g.output_bins, 0.95),
            cost_usd=spent,
            share_pct=(spent / total_cost * 100).quantize(Decimal("0.01")) if total_cost else Decimal(0),
        )
        if "tier" in group_by:
            row.update(_agreement(row, members[key], shadows, len(days)))
        rows.append(row)
    shadow_list = sorted(shadow_rows.values(), key=lambda r: (r["task"], r["tier"]))
    for r in shadow_list:
        r["dropped"] = sum(n for (task, _), n in dropped.items() if task == r["task"])
    return {"group_by": group_by, "rows": rows, "shadow": shadow_list, "total_cost_usd": total_cost}


def _agreement(
    row: dict[str, Any],
    members: list[tuple[Key, Group]],
    shadows: dict[tuple[str, str], dict[str, Shadowed]],
    days: int,
) -> dict[str, Any]:
    found: dict[str, Shadowed] = {}
    for k, _ in members:
        for name, s in shadows.get((k.task or NO_TASK, k.tier), {}).items():
            found.setdefault(name, s)
    if not found:
        return {"shadow_tier": None, "shadow_samples": 0}
    best = max(found.values(), key=lambda s: s.samples)
    low, high = wilson(best.agree, best.samples)
    moved = sum((k.cost(g, best.price_in, best.price_out) for k, g in members), Decimal(0))
    saving = row["cost_usd"] - moved
    return {
        "shadow_tier": best.tier,
        "shadow_samples": best.samples,
        "shadow_agree": best.agree,
        "agreement": round(best.agree / best.samples, 4) if best.samples else None,
        "agreement_low": round(low, 4),
        "agreement_high": round(high, 4),
        "saving_usd": saving,
        "saving_per_day_usd": saving / days if days else saving,
        "days": days,
    }


def _money(v: Decimal) -> str:
    return f"{v.quantize(Decimal('0.0001')):,}"


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return msgspec.json.encode(report, enc_hook=str).decode() + "\n"
    group_by: list[str] = report["group_by"]
    rows: list[dict[str, Any]] = report["rows"]
    columns = [
        *group_by,
        "requests",
        "mean_input",
        "p95_input",
        "mean_output",
        "p95_output",
        "cost_usd",
        "share_pct",
    ]
    with_tier = "tier" in group_by
    if with_tier:
        columns += ["shadow_tier", "shadow_samples", "agreement", "agreement_ci95", "saving_per_day_usd"]
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r, c) for c in columns])
        return buf.getvalue()
    table = [columns] + [[_cell(r, c) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    text = [
        "  ".join(
            v.ljust(w) if i < len(group_by) else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    text.append(f"total (client traffic): ${_money(report['total_cost_usd'])}")
    for s in report["shadow"]:
        text.append(
            f"shadow traffic (billed to the platform): {s['task']} on {s['tier']}: {s['requests']:,} calls, "
            f"{s['compared']:,} compared, {s['dropped']:,} dropped, ${_money(s['cost_usd'])}"
        )
    return "\n".join(text) + "\n"


def _cell(r: dict[str, Any], c: str) -> str:
    if c == "agreement_ci95":
        if not r.get("shadow_samples"):
            return "-"
        return f"[{r['agreement_low'] * 100:.1f}%, {r['agreement_high'] * 100:.1f}%]"
    v = r.get(c)
    if v is None:
        return "-"
    if c == "agreement":
        return f"{v * 100:.1f}%"
    if c in ("cost_usd", "saving_per_day_usd"):
        return _money(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
