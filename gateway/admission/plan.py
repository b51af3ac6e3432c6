"""Admission's plan: which counters (items) a request must pass, and their Redis keys — a pure
function of the policy and the request.

Key names, one hash tag per tenant (or per tier for tier-wide limits) so that a tenant's keys
share a Redis Cluster slot:

    gw:{t:<tenant>}:rl:<limit#>:key:<key id>:<r|t|c>      scope: key
    gw:{t:<tenant>}:rl:<limit#>:tenant:<r|t|c>            scope: tenant
    gw:{t:<tenant>}:rl:<limit#>:tier:<tier>:<r|t|c>       scope: tenant+tier
    gw:{tier:<tier>}:rl:<limit#>:<r|t|c>                  scope: tier
    gw:{t:<tenant>}:budget:day:<YYYY-MM-DD> / :budget:month:<YYYY-MM>   budgets (nano-dollars)
"""

from __future__ import annotations

import datetime
import enum
import re

import msgspec

from gateway.auth import Principal
from gateway.policy.schema import Budget, Limit, Policy, Scope

MINUTE_US = 60_000_000


class Kind(enum.StrEnum):
    """What an item counts; the value is what the Lua scripts read."""

    REQUESTS = "r"
    TOKENS = "t"
    CONCURRENCY = "c"
    BUDGET = "b"


class Item(msgspec.Struct, frozen=True):
    kind: Kind
    key: str
    limit: int
    period_us: int
    cost: int
    scope: str = ""  # the limit's scope, for metrics
    window: str = ""  # a budget's: "daily" or "monthly"

    @property
    def emission_us(self) -> float:
        return self.period_us / self.limit


def budget_items(tenant: str, budget: Budget, cost: int, enforce: bool, now: datetime.datetime) -> tuple[Item, ...]:
    """The day's and month's spend counters of ``tenant``; with ``enforce`` off they only count."""
    tag = _tag(tenant)
    tomorrow = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    next_month = (now.replace(day=28) + datetime.timedelta(days=4)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    out = []
    for limit, key, ends, window in (
        (budget.daily, f"gw:{{t:{tag}}}:budget:day:{now:%Y-%m-%d}", tomorrow, "daily"),
        (budget.monthly, f"gw:{{t:{tag}}}:budget:month:{now:%Y-%m}", next_month, "monthly"),
    ):
        if limit is not None:
            period = int((ends - now).total_seconds() * 1_000_000)
            out.append(Item(Kind.BUDGET, key, limit if enforce else 2**52, period, cost, "budget", window))
    return tuple(out)


_UNSAFE = re.compile(r"[{}\s]")


def _tag(value: str) -> str:
    return _UNSAFE.sub("_", value)


def applies(limit: Limit, principal: Principal, tier: str) -> bool:
    if limit.tenant is not None and limit.tenant != principal.tenant:
        return False
    return not (limit.tier is not None and limit.tier != tier)


def plan(policy: Policy, principal: Principal, tier: str, tokens: int, ttl_us: int) -> tuple[Item, ...]:
    """The items a request must pass: a pure function of the policy and the request."""
    items: list[Item] = []
    tenant = _tag(principal.tenant)
    for lim in policy.limits:
        if not applies(lim, principal, tier):
            continue
        if lim.scope is Scope.KEY:
            base = f"gw:{{t:{tenant}}}:rl:{lim.index}:key:{_tag(principal.key_id)}"
        elif lim.scope is Scope.TENANT:
            base = f"gw:{{t:{tenant}}}:rl:{lim.index}:tenant"
        elif lim.scope is Scope.TENANT_TIER:
            base = f"gw:{{t:{tenant}}}:rl:{lim.index}:tier:{_tag(tier)}"
        else:
            base = f"gw:{{tier:{_tag(tier)}}}:rl:{lim.index}"
        scope = lim.scope.value
        if lim.rpm is not None:
            items.append(Item(Kind.REQUESTS, f"{base}:r", lim.rpm, MINUTE_US, 1, scope))
        if lim.tpm is not None:
            items.append(Item(Kind.TOKENS, f"{base}:t", lim.tpm, MINUTE_US, tokens, scope))
        if lim.concurrency is not None:
            items.append(Item(Kind.CONCURRENCY, f"{base}:c", lim.concurrency, ttl_us, 1, scope))
    return tuple(items)
