"""One money function: every path that turns tokens into dollars agrees to the micro-dollar.

The paths are the ledger record (``Exchange.ledger_record``), the per-request metric
(``Exchange.finish``'s cost, the same record price), the budget settlement in nano-dollars
(``Exchange.used_spend``), the admission's budget reservation (``Price.nano`` on the tier's price),
``policy explain``'s estimate, ``policy simulate``'s per-tier total, and the ledger report's
re-pricing of a record group from the record's own price strings.
"""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.exchange import Exchange
from gateway.facts import RequestFacts
from gateway.policy import RoutingDecision, parse
from gateway.policy.explain import explain
from gateway.policy.schema import BUDGET_UNIT, Price
from gateway.policy.simulate import Tally, _summary
from gateway.pool import Worker
from gateway.schemas import Endpoint, TokenDetails, UsageOnly

PRICES = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
TOKENS = st.integers(min_value=0, max_value=10**9)
MICRO = Decimal("0.000001")


def _policy(price_in: Decimal, price_out: Decimal, price_cached: Decimal | None):  # type: ignore[no-untyped-def]
    cached = f", cached_input: {price_cached}" if price_cached is not None else ""
    text = (
        "version: 1\n"
        "tiers:\n"
        f"  small: {{model: m, price: {{input: {price_in}, output: {price_out}{cached}}}}}\n"
        "routes:\n"
        "  - {name: all, tier: small}\n"
    )
    return parse(text, "money.yaml")


@settings(max_examples=60, deadline=None)
@given(PRICES, PRICES, st.none() | PRICES, TOKENS, TOKENS, st.integers(min_value=0, max_value=10**9))
def test_every_cost_path_agrees_to_the_micro_dollar(
    price_in: Decimal, price_out: Decimal, price_cached: Decimal | None, prompt: int, completion: int, cached: int
) -> None:
    cached = min(cached, prompt)
    policy = _policy(price_in, price_out, price_cached)
    tier = policy.tiers["small"]
    truth = Price(price_in, price_out, cached_input=price_cached).cost(prompt, completion, cached)
    billed_in = price_in * (prompt - cached) + (price_cached if price_cached is not None else price_in) * cached
    assert truth * 1_000_000 == billed_in + price_out * completion  # exact: nothing rounded away

    ex = Exchange("r1", Endpoint.CHAT, policy, None, None, None)  # type: ignore[arg-type]
    worker = Worker("small", "http://w:1", "m")
    ex.decision = RoutingDecision(policy.revision, "all", "small", ())
    ex.trace.reached = worker
    ex.usage = UsageOnly(prompt, completion, TokenDetails(cached))
    record = ex.ledger_record(worker)
    assert Decimal(record.cost_usd) == truth
    report_price = Price(
        Decimal(record.price_input),
        Decimal(record.price_output),
        cached_input=Decimal(record.price_cached_input) if record.price_cached_input else None,
    )
    assert report_price.cost(record.prompt_tokens, record.completion_tokens, record.cached_tokens) == truth

    nano = ex.used_spend()
    assert nano is not None
    assert 0 <= Decimal(nano) / BUDGET_UNIT - truth < Decimal(1) / BUDGET_UNIT  # rounded up, under a nano-dollar
    assert abs(Decimal(nano) / BUDGET_UNIT - truth) < MICRO

    # estimates price no cached tokens: explain, simulate and admission's budget reservation
    plain = tier.price.cost(prompt, completion)
    facts = RequestFacts("t", None, "auto", prompt, completion, False, {})
    estimate = explain(policy, facts).estimated_cost_usd
    assert estimate is not None and Decimal(estimate) == plain
    tally = Tally()
    tally.requests[("all", "small")] = 1
    tally.input[("all", "small")] = prompt
    tally.output[("all", "small")] = completion
    assert _summary(policy, tally)["by_tier"]["small"]["cost_usd"] == plain
    assert abs(Decimal(tier.price.nano(prompt, completion)) / BUDGET_UNIT - plain) < MICRO


def test_embeddings_are_billed_at_their_own_input_price() -> None:
    policy = parse(
        "version: 1\ntiers:\n  small: {model: m, price: {input: 1, output: 2, embeddings: 0.5}}\n"
        "routes:\n  - {name: all, tier: small}\n",
        "e.yaml",
    )
    ex = Exchange("r1", Endpoint.EMBEDDINGS, policy, None, None, None)  # type: ignore[arg-type]
    assert ex.price("small").cost(1_000_000, 0) == Decimal("0.5")
    assert policy.tiers["small"].price.cost(1_000_000, 0, endpoint="embeddings") == Decimal("0.5")
    assert policy.tiers["small"].price.cost(1_000_000, 0) == Decimal(1)
