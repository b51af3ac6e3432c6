"""Budgets: checked and reserved in the admission round trip, settled to the actual cost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from gateway.admission import Admitter, BudgetDowngrade
from gateway.auth import Principal
from gateway.errors import BudgetExceeded
from gateway.facts import RequestFacts
from gateway.policy import PolicyError, RoutingDecision, decide, parse
from gateway.policy.schema import Price
from gateway.resp import RespConnection

BASE = """version: 1
tiers:
  small: {model: s, price: {input: 0.10, output: 0.40}}
  frontier: {model: f, price: {input: 3.00, output: 15.00}}
routes:
  - name: careful
    match: {budget_used_pct: {gte: 80}}
    tier: small
  - name: default
    tier: frontier
"""
MEDIA = Principal("key_m", "media")
FACTS = RequestFacts("media", None, "auto", 10, 20, False, {})  # 10 in + 20 out
COST = Price(Decimal("3.00"), Decimal("15.00")).nano(10, 20)


def policy(budget: str):  # type: ignore[no-untyped-def]
    return parse(BASE + "budgets:\n" + budget, "b.yaml")


def frontier(p) -> RoutingDecision:  # type: ignore[no-untyped-def]
    return RoutingDecision(p.revision, "default", "frontier", ())


@pytest.fixture
async def adm(redis_url: str) -> AsyncIterator[Admitter]:
    conn = RespConnection(redis_url)
    yield Admitter(conn)
    await conn.close()


def test_spend_is_exact_nano_dollars_rounded_up() -> None:
    assert COST == 330_000  # (10 x $3 + 20 x $15) per million tokens = $0.00033
    assert Price(Decimal("0.1"), Decimal("0.4")).nano(1, 0) == 100
    assert Price(Decimal("0.0000001"), Decimal(0)).nano(1, 0) == 1  # a fraction of a nano-dollar counts as one


async def test_reject_when_spent_and_settle_gives_back(adm: Admitter) -> None:
    p = policy("  - {tenant: media, daily_usd: 0.001, action: reject}\n")
    held = [await adm.reserve(p, MEDIA, FACTS, frontier(p), f"r{i}") for i in range(3)]  # 3 x 330,000 of 1,000,000
    with pytest.raises(BudgetExceeded) as info:
        await adm.reserve(p, MEDIA, FACTS, frontier(p), "r3")
    err = info.value
    assert (err.status, err.code, err.limit_type) == (429, "insufficient_quota", "insufficient_quota")
    assert "daily budget of tenant 'media' ($0.001)" in err.message and int(err.headers["retry-after"]) >= 1
    assert err.body().startswith(b'{"error":{"message"') and b'"code":"insufficient_quota"' in err.body()
    adm.settle(held[0], 12, 10_000)  # the first cost far less than estimated: 1,000,000 - 670,000 left
    await adm.flush()
    await adm.reserve(p, MEDIA, FACTS, frontier(p), "r4")
    other = Principal("key_a", "ads")  # tenants without a budget are not limited
    for i in range(5):
        await adm.reserve(p, other, RequestFacts("ads", None, "auto", 10, 20, False, {}), frontier(p), f"a{i}")


async def test_downgrade_when_spent_and_keep_counting(adm: Admitter) -> None:
    p = policy("  - {tenant: media, daily_usd: 0.0007, monthly_usd: 100, action: downgrade, downgrade_to: small}\n")
    await adm.reserve(p, MEDIA, FACTS, frontier(p), "r0")
    await adm.reserve(p, MEDIA, FACTS, frontier(p), "r1")
    with pytest.raises(BudgetDowngrade) as info:
        await adm.reserve(p, MEDIA, FACTS, frontier(p), "r2")
    assert info.value.tier == "small"
    small = RoutingDecision(p.revision, "default+budget-downgrade", "small", ())
    a = await adm.reserve(p, MEDIA, FACTS, small, "r2", enforce_budget=False)
    assert a.reserved_spend == Price(Decimal("0.10"), Decimal("0.40")).nano(10, 20)
    used = await adm.budget_used_pct(p)
    assert used == {"media": (2 * COST + a.reserved_spend) * 100 // 700_000}


async def test_budget_used_pct_routes(adm: Admitter) -> None:
    p = policy("  - {tenant: media, daily_usd: 0.001, action: reject}\n")
    assert decide(p, FACTS).route == "default"
    for i in range(3):
        await adm.reserve(p, MEDIA, FACTS, frontier(p), f"r{i}")
    pct = (await adm.budget_used_pct(p))["media"]
    assert pct == 99
    facts = RequestFacts("media", None, "auto", 10, 20, False, {}, budget_used_pct=pct)
    assert decide(p, facts).route == "careful"


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (
            "  - {tenant: media, daily_usd: 5, action: shout}\n",
            "budgets[0].action: must be one of reject, downgrade, not 'shout'",
        ),
        ("  - {tenant: media, action: reject}\n", "budgets[0]: give daily_usd, monthly_usd or both"),
        ("  - {tenant: media, daily_usd: 0, action: reject}\n", "budgets[0].daily_usd: must be greater than 0"),
        ("  - {tenant: media, daily_usd: 5, action: downgrade}\n", "budgets[0]: a downgrade names its tier"),
        (
            "  - {tenant: media, daily_usd: 5, action: downgrade, downgrade_to: tiny}\n",
            "budgets[0].downgrade_to: unknown tier 'tiny'",
        ),
        (
            "  - {tenant: media, daily_usd: 5, action: reject, downgrade_to: small}\n",
            "budgets[0].downgrade_to: only a downgrade budget has one",
        ),
        (
            "  - {tenant: media, daily_usd: 5, action: reject}\n  - {tenant: media, monthly_usd: 5, action: reject}\n",
            "budgets[1].tenant: a budget for 'media' is already given",
        ),
    ],
)
def test_bad_budgets(budget: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy(budget)
    assert any(message in problem for problem in info.value.problems), info.value.problems
