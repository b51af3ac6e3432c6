"""Explain a routing decision: every route in order, each condition and whether it held.

Built on the same ``conditions`` and ``decide`` the gateway routes with, so an explanation can
never disagree with what the gateway does. The estimated cost is at the chosen tier's price: the
prompt estimate as input, and ``max_tokens`` (or the tier's ``default_max_tokens``) as output.
"""

from __future__ import annotations

import msgspec

from gateway.errors import GatewayError
from gateway.facts import RequestFacts
from gateway.policy.decide import Condition, RoutingDecision, conditions, decide, fitting_tiers, split_side
from gateway.policy.schema import Policy


class RouteCheck(msgspec.Struct, frozen=True):
    route: str
    line: int
    conditions: list[Condition]
    conditions_hold: bool
    fitting_tiers: list[str]  # the route's tiers (split side first) that fit the request's context
    split_side: str | None
    matched: bool


class Explanation(msgspec.Struct, frozen=True):
    policy: str
    facts: RequestFacts
    routes: list[RouteCheck]
    decision: RoutingDecision | None
    error: str | None
    output_tokens_estimate: int | None
    output_estimate_from: str | None  # "max_tokens" or "default_max_tokens"
    estimated_cost_usd: str | None


def explain(policy: Policy, facts: RequestFacts) -> Explanation:
    checks: list[RouteCheck] = []
    matched_seen = False
    for route in policy.routes:
        conds = list(conditions(route.match, facts))
        hold = all(c.held for c in conds)
        tiers = list(fitting_tiers(policy, route, facts)) if hold else []
        matched = hold and bool(tiers) and not matched_seen
        matched_seen = matched_seen or matched
        side = split_side(route, facts) if route.split else None
        checks.append(RouteCheck(route.name, route.line, conds, hold, tiers, side, matched))
    try:
        decision: RoutingDecision | None = decide(policy, facts)
        error = None
    except GatewayError as exc:
        decision, error = None, exc.message
    out_tokens = out_from = price = None
    if decision is not None:
        tier = policy.tiers[decision.tier]
        out_from = "max_tokens" if facts.max_tokens is not None else "default_max_tokens"
        out_tokens = facts.output_estimate(tier.default_max_tokens)  # n / best_of: each may run to the end
        price = str(tier.price.cost(facts.prompt_tokens, out_tokens, endpoint=facts.endpoint))
    return Explanation(policy.revision, facts, checks, decision, error, out_tokens, out_from, price)


def render_text(e: Explanation) -> str:
    f = e.facts
    lines = [
        f"policy {e.policy}",
        f"request: tenant={f.tenant} task={f.task} model={f.model} prompt_tokens={f.prompt_tokens} "
        f"max_tokens={f.max_tokens} stream={f.stream}",
        "",
    ]
    for r in e.routes:
        mark = (
            "MATCH"
            if r.matched
            else (
                "holds, but no tier fits"
                if r.conditions_hold and not r.fitting_tiers
                else ("holds (an earlier route won)" if r.conditions_hold else "no")
            )
        )
        lines.append(f"route {r.route} (line {r.line}): {mark}")
        if not r.conditions:
            lines.append("    (no conditions: matches every request)")
        for c in r.conditions:
            lines.append(f"    {'✓' if c.held else '✗'} {c.name}: wants {c.expected}, got {c.actual!r}")
        if r.split_side:
            lines.append(f"    split: this caller's side is {r.split_side}")
    lines.append("")
    if e.decision is None:
        lines.append(f"no route: {e.error}")
    else:
        d = e.decision
        lines.append(f"→ route {d.route}, tier {d.tier}, fallbacks {list(d.fallbacks) or 'none'}")
        lines.append(
            f"  estimated cost ${e.estimated_cost_usd} ({f.prompt_tokens} input tokens, "
            f"{e.output_tokens_estimate} output tokens from {e.output_estimate_from})"
        )
    return "\n".join(lines) + "\n"
