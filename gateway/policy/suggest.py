"""``policy suggest``: from the ledger's evidence, a candidate policy that moves the tasks a cheaper
tier answers as well.

A task moves when, on the route that served it, its shadow comparisons against a cheaper tier number
at least ``min_samples`` and the lower end of their agreement's 95% Wilson interval is at least
``min_agreement``. The route moves in place when every task it served qualifies (its tier becomes
the shadow tier, the old tier its first fallback); otherwise a narrowed copy matching only the
qualifying task is inserted just before it. A moved route keeps a shadow to its old tier (same
sample and comparator), so agreement goes on being measured — the guard of a ramp watches it.

Pure: policy text and evidence rows in, candidate text and the decisions out. YAML is edited as
data (prices kept as exact decimals); comments of the current policy are not carried over.
"""

from __future__ import annotations

import copy
import datetime
from decimal import Decimal
from typing import Any

import msgspec
import yaml

from gateway.evidence import NO_TASK
from gateway.policy.load import parse
from gateway.policy.schema import Policy


class Move(msgspec.Struct):
    task: str
    route: str
    from_tier: str
    to_tier: str
    samples: int
    agreement: float | None
    low: float
    high: float
    saving_per_day_usd: Decimal
    moves: bool
    reason: str


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


def _decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Decimal:
    assert isinstance(node, yaml.ScalarNode)
    return Decimal(str(loader.construct_scalar(node)))


_Loader.add_constructor("tag:yaml.org,2002:float", _decimal)
_Dumper.add_representer(Decimal, lambda dumper, d: dumper.represent_scalar("tag:yaml.org,2002:float", str(d)))


def judge(policy: Policy, rows: list[dict[str, Any]], min_agreement: float, min_samples: int) -> list[Move]:
    """One decision per (task, route, tier) row of ``evidence.task_report(group_by=task,tier,route)``
    that has shadow comparisons."""
    routes = {r.name: r for r in policy.routes}
    out = []
    for row in rows:
        target = row.get("shadow_tier")
        if not target:
            continue
        route = routes.get(row["route"])
        samples, low = row["shadow_samples"], row["agreement_low"]
        saving = row["saving_per_day_usd"]
        if route is None:
            moves, reason = False, "the route is not in the current policy"
        elif route.split or route.tier != row["tier"]:
            moves, reason = False, f"route {route.name} no longer sends it to {row['tier']} alone"
        elif target not in policy.tiers:
            moves, reason = False, f"tier {target} is not in the current policy"
        elif samples < min_samples:
            moves, reason = False, f"only {samples} samples (need {min_samples})"
        elif low < min_agreement:
            moves, reason = False, f"agreement lower bound {low:.1%} < {min_agreement:.1%}"
        elif saving <= 0:
            moves, reason = False, f"{target} is not cheaper"
        else:
            moves, reason = True, f"agreement lower bound {low:.1%} >= {min_agreement:.1%} over {samples} samples"
        out.append(
            Move(
                row["task"],
                row["route"],
                row["tier"],
                target,
                samples,
                row["agreement"],
                low,
                row["agreement_high"],
                saving,
                moves,
                reason,
            )
        )
    return out


def candidate(text: str, policy: Policy, decisions: list[Move], served: dict[str, set[str]], header: str) -> str:
    """The current policy ``text`` with the moving decisions applied; ``served``: route -> tasks it
    served in the evidence window. Raises ``PolicyError`` if the result does not validate (a bug)."""
    data = yaml.load(text, Loader=_Loader)
    routes: list[dict[str, Any]] = data["routes"]
    moving = [d for d in decisions if d.moves]
    by_route: dict[str, list[Move]] = {}
    for d in moving:
        by_route.setdefault(d.route, []).append(d)
    for name, moves in by_route.items():
        index = next(i for i, r in enumerate(routes) if r.get("name") == name)
        raw = routes[index]
        tasks = {m.task for m in moves}
        to_tier = moves[0].to_tier
        if served.get(name, set()) <= tasks and raw.get("match", {}).get("task"):
            _move(raw, to_tier)
            continue
        for m in moves:  # a narrowed copy for each qualifying task, before the route
            new = copy.deepcopy(raw)
            new["name"] = f"{name}-{m.task}"
            new.setdefault("match", {})["task"] = [m.task] if m.task != NO_TASK else new["match"].get("task")
            _move(new, m.to_tier)
            routes.insert(index, new)
            index += 1
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)
    out = header + body
    parse(out, "<candidate>")
    return out


def _move(raw: dict[str, Any], to_tier: str) -> None:
    old = raw["tier"]
    raw["tier"] = to_tier
    raw["fallback"] = [old, *(f for f in raw.get("fallback", []) if f not in (old, to_tier))]
    kept = {k: v for k, v in (raw.get("shadow") or {"sample": Decimal("0.05")}).items() if k != "tier"}
    raw["shadow"] = {"tier": old, **kept}  # keep measuring, now against the tier it left


def header(moves: list[Move], since: str | None, until: str | None, min_agreement: float, min_samples: int) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Candidate written by `gateway policy suggest` at {now}, from the ledger's shadow comparisons",
        f"# ({since or 'first day'} .. {until or 'last day'}; moves a task when the lower end of its agreement's",
        f"# 95% Wilson interval is >= {min_agreement} over >= {min_samples} samples):",
    ]
    for m in moves:
        verdict = "MOVES" if m.moves else "stays"
        lines.append(f"#   {m.task} ({m.route}): {m.from_tier} -> {m.to_tier} {verdict}: {m.reason}")
    return "\n".join(lines) + "\n"


def render(moves: list[Move]) -> str:
    lines = []
    for m in moves:
        rate = f"{m.agreement:.1%}" if m.agreement is not None else "-"
        verdict = f"moves to {m.to_tier}" if m.moves else f"stays on {m.from_tier}"
        lines.append(
            f"  {m.task:<16} route {m.route:<12} {m.from_tier} vs {m.to_tier}: {m.samples:,} samples, "
            f"agreement {rate} [95% CI {m.low:.1%}, {m.high:.1%}], saving if moved "
            f"${m.saving_per_day_usd.quantize(Decimal('0.01'))}/day -> {verdict} ({m.reason})"
        )
    return "\n".join(lines) + "\n"
