"""Refusals and headers: OpenAI's ``x-ratelimit-*`` headers from the script's reply, and the 429s
(or the budget downgrade) a refused item turns into."""

from __future__ import annotations

import math
from decimal import Decimal

from gateway.admission.call import AdmitCall
from gateway.admission.plan import Item, Kind
from gateway.errors import BudgetExceeded, RateLimited
from gateway.policy.decide import RoutingDecision
from gateway.policy.schema import BUDGET_UNIT, Budget


class BudgetDowngrade(Exception):
    """The tenant's budget is spent and its action is to route to a cheaper tier."""

    def __init__(self, tier: str):
        super().__init__(tier)
        self.tier = tier


def duration(us: float) -> str:
    """OpenAI's style for reset times: 20ms, 1.5s, 6m0s."""
    if us < 1_000_000:
        return f"{max(us, 0) / 1000:.0f}ms"
    s = us / 1_000_000
    if s < 60:
        return f"{s:.3g}s"
    return f"{int(s // 60)}m{int(s % 60)}s"


def budget_refusal(
    tenant: str, budget: Budget, item: Item, decision: RoutingDecision, retry_us: int, headers: dict[str, str]
) -> Exception:
    """A spent budget: route to the cheaper tier if the budget says so, else 429 insufficient_quota."""
    if budget.downgrade_to is not None and decision.tier != budget.downgrade_to:
        return BudgetDowngrade(budget.downgrade_to)
    retry_s = max(1, math.ceil(retry_us / 1_000_000))
    return BudgetExceeded(
        f"The {item.window} budget of tenant {tenant!r} (${Decimal(item.limit) / BUDGET_UNIT}) is spent.",
        tenant=tenant,
        headers={**headers, "retry-after": str(retry_s)},
    )


def rate_limit_headers(compiled: AdmitCall, result: list[int]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest request and token limits, from the script's
    reply (per item: remaining, microseconds to full), with item positions worked out in advance."""
    out: dict[str, str] = {}
    for positions, name in ((compiled.requests, "requests"), (compiled.tokens, "tokens")):
        if not positions:
            continue
        best = min(positions, key=lambda i: result[4 + 2 * i])
        out[f"x-ratelimit-limit-{name}"] = str(compiled.items[best].limit)
        out[f"x-ratelimit-remaining-{name}"] = str(result[4 + 2 * best])
        out[f"x-ratelimit-reset-{name}"] = duration(result[5 + 2 * best])
    return out


_WHAT = {Kind.REQUESTS: "requests per minute", Kind.TOKENS: "tokens per minute"}


def rejection(item: Item, retry_after_us: int, headers: dict[str, str], tokens: int) -> RateLimited:
    retry_s = max(1, math.ceil(retry_after_us / 1_000_000))
    what = {Kind.REQUESTS: "requests per minute", Kind.TOKENS: "tokens per minute"}.get(
        item.kind, "concurrent requests"
    )
    detail = f" (this request needs {tokens} tokens)" if item.kind == Kind.TOKENS else ""
    return RateLimited(
        f"Rate limit reached: {item.limit} {what}{detail}. Please try again in {retry_s}s.",
        scope=item.scope,
        limit={Kind.REQUESTS: "requests", Kind.TOKENS: "tokens"}.get(item.kind, "concurrency"),
        limit_type="tokens" if item.kind == Kind.TOKENS else "requests",
        headers={**headers, "retry-after": str(retry_s), "retry-after-ms": str(max(1, retry_after_us // 1000))},
    )
