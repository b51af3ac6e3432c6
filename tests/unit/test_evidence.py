"""Evidence for tiering, the pure parts: comparators, the Wilson interval, token histograms, the
shadow route key, ``split_by: prompt``, the suggestion and the ramp's steps and guard."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from gateway.compare import compare, exact, similarity
from gateway.evidence import percentile, wilson
from gateway.facts import RequestFacts
from gateway.ledger import LedgerRecord, _fields, bin_high, from_fields, token_bin
from gateway.policy.decide import decide, split_side
from gateway.policy.load import PolicyError, parse
from gateway.policy.ramp import Moved, Watch, moved_routes, step_text, verdict
from gateway.policy.schema import Compare
from gateway.policy.suggest import candidate, judge

POLICY = """version: 1
tiers:
  small: {model: s, workers: [{url: "http://127.0.0.1:1"}], price: {input: 0.10, output: 0.40}}
  frontier: {model: f, workers: [{url: "http://127.0.0.1:2"}], price: {input: 3.00, output: 15.00}}
routes:
  - name: categorize
    match: {task: [categorization, classification]}
    tier: frontier
    shadow: {tier: small, sample: 0.05}
  - name: summarize
    match: {task: [summarization]}
    tier: frontier
    shadow: {tier: small, sample: 0.05, compare: similarity, threshold: 0.6}
  - name: default
    tier: frontier
"""


def facts(task: str | None = None, text: str = "", tenant: str = "media") -> RequestFacts:
    return RequestFacts(tenant, task, "auto", 10, None, False, {}, last_user_text=text)


# --- comparators ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("Sports.", " sports", True),
        ('"Politics"', "politics", True),
        ("Business  News", "business news!", True),
        ('{"a": 1, "b": [1, 2]}', '{"b":[1,2],"a":1}', True),
        ('{"a": 1}', '{"a": 2}', False),
        ("sports", "politics", False),
    ],
)
def test_exact_match_is_normalized(a: str, b: str, same: bool) -> None:
    assert exact(a, b) is same


def test_similarity_is_rouge_l_over_words() -> None:
    assert similarity("the cat sat down", "the cat sat down") == 1.0
    # LCS of (a b c d) and (a c d e) is a c d: 2 * 3 / (4 + 4)
    assert similarity("a b c d", "A, c d e") == pytest.approx(0.75)
    assert similarity("one two", "three four") == 0.0
    assert similarity("", "") == 1.0


def test_auto_chooses_by_length_and_threshold_decides_long_answers() -> None:
    short = compare("Sports", "sports.", Compare.AUTO, 0.5)
    assert (short.measure, short.agree, short.score) == ("exact", True, 1.0)
    long_a = " ".join(f"w{i}" for i in range(40))
    long_b = " ".join(f"w{i}" for i in range(20)) + " " + " ".join(f"x{i}" for i in range(20))
    c = compare(long_a, long_b, Compare.AUTO, 0.5)
    assert c.measure == "similarity" and c.score == pytest.approx(0.5) and c.agree
    assert not compare(long_a, long_b, Compare.SIMILARITY, 0.51).agree
    assert not compare("sports", "sport", Compare.EXACT, 0.0).agree


# --- statistics and histograms -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agree", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (50, 100, 0.4038, 0.5962), (248, 250, 0.9713, 0.9978)],
)
def test_wilson_interval(agree: int, n: int, low: float, high: float) -> None:
    got = wilson(agree, n)
    assert got == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_wilson_of_nothing_is_everything() -> None:
    assert wilson(0, 0) == (0.0, 1.0)


def test_token_bins_are_exact_below_256_and_within_4_percent_above() -> None:
    previous = -1
    for n in range(0, 70_000, 7):
        b = token_bin(n)
        assert b >= previous and n <= bin_high(b) <= n * 1.04 + 1
        previous = b
    assert all(bin_high(token_bin(n)) == n for n in range(256))
    assert token_bin(10**9) < 2000  # a bounded number of hash fields, whatever the counts


def test_percentile_from_bins() -> None:
    bins = Counter({token_bin(n): 1 for n in range(1, 101)})
    assert percentile(bins, 0.95) == 95
    assert percentile(Counter(), 0.95) == 0
    assert percentile(Counter({token_bin(1000): 19, token_bin(5000): 1}), 0.95) == bin_high(token_bin(1000))


def test_shadow_fields_survive_the_stream_round_trip() -> None:
    base: dict[str, Any] = dict(
        request_id="r.shadow",
        time=1.0,
        tenant="(platform)",
        key_id="-",
        route="categorize",
        tier="small",
        model="s",
        worker="http://w",
        policy="v1",
        prompt_tokens=5,
        completion_tokens=2,
        prompt_tokens_estimate=5,
        price_input="0.10",
        price_output="0.40",
        cost_usd="0.0000013",
        outcome="shadow",
        attempts=1,
        ttfb_ms=None,
        latency_ms=3.0,
    )
    for agree, score in ((True, 1.0), (False, 0.125), (None, None)):
        rec = LedgerRecord(**base, shadow_of="r", primary_tier="frontier", comparator="exact", score=score, agree=agree)
        fields = _fields(rec)
        assert from_fields(dict(zip(fields[::2], fields[1::2], strict=True))) == rec


# --- the policy: shadow, split by prompt ---------------------------------------------------------


def test_a_route_shadow_is_loaded_and_carried_by_the_decision() -> None:
    policy = parse(POLICY)
    d = decide(policy, facts("summarization"))
    assert d.shadow is not None and d.shadow.tier == "small" and d.shadow.sample == 0.05
    assert (d.shadow.compare, d.shadow.threshold, d.shadow.max_in_flight) == (Compare.SIMILARITY, 0.6, 4)
    assert decide(policy, facts("other")).shadow is None


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        ("{tier: tiny, sample: 0.1}", "p.yaml:9: routes[0].shadow.tier: unknown tier 'tiny'"),
        ("{tier: small, sample: 0}", "p.yaml:9: routes[0].shadow.sample: must be greater than 0 and at most 1"),
        ("{tier: small, sample: 1.5}", "p.yaml:9: routes[0].shadow.sample: must be greater than 0 and at most 1"),
        ("{tier: small, sample: 0.1, threshold: 2}", "p.yaml:9: routes[0].shadow.threshold: must be between 0 and 1"),
        (
            "{tier: small, sample: 0.1, max_in_flight: 0}",
            "p.yaml:9: routes[0].shadow.max_in_flight: must be at least 1",
        ),
        ("{tier: small, sample: 0.1, compare: fuzzy}", "p.yaml:9: routes[0].shadow.compare: "),
        ("{tier: small}", "p.yaml:9: routes[0].shadow: missing required field 'sample'"),
        ("{tier: small, sample: 0.1, rate: 2}", "p.yaml:9: routes[0].shadow: unknown field 'rate'"),
    ],
)
def test_bad_shadows_are_refused_at_their_line(shadow: str, message: str) -> None:
    text = POLICY.replace("shadow: {tier: small, sample: 0.05}", f"shadow: {shadow}")
    with pytest.raises(PolicyError) as err:
        parse(text, "p.yaml")
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


def test_split_by_prompt_spreads_one_tenants_traffic_and_keeps_a_prompt_on_its_side() -> None:
    text = POLICY.replace(
        "    tier: frontier\n    shadow: {tier: small, sample: 0.05}\n",
        "    split: {small: 30, frontier: 70}\n    split_by: prompt\n",
    )
    route = parse(text).routes[0]
    sides = Counter(split_side(route, facts("categorization", f"article {i}")) for i in range(2000))
    assert 0.26 < sides["small"] / 2000 < 0.34
    assert len({split_side(route, facts("categorization", "same", tenant=t)) for t in "abcdefgh"}) == 1


# --- suggest -------------------------------------------------------------------------------------


def row(task: str, route: str, samples: int, agree: int, saving: str = "5") -> dict[str, Any]:
    low, high = wilson(agree, samples)
    return {
        "task": task,
        "tier": "frontier",
        "route": route,
        "shadow_tier": "small",
        "shadow_samples": samples,
        "shadow_agree": agree,
        "agreement": agree / samples,
        "agreement_low": low,
        "agreement_high": high,
        "saving_per_day_usd": Decimal(saving),
    }


def test_suggest_moves_exactly_the_tasks_whose_lower_bound_clears_the_bar() -> None:
    policy = parse(POLICY)
    rows = [
        row("categorization", "categorize", 250, 249),
        row("summarization", "summarize", 250, 120),
    ]
    moves = judge(policy, rows, 0.95, 30)
    assert [(m.task, m.moves) for m in moves] == [("categorization", True), ("summarization", False)]
    text = candidate(POLICY, policy, moves, {"categorize": {"categorization"}}, "# test\n")
    routes = {r.name: r for r in parse(text).routes}
    assert routes["categorize"].tier == "small" and routes["categorize"].fallback == ("frontier",)
    assert routes["categorize"].shadow is not None and routes["categorize"].shadow.tier == "frontier"
    assert routes["summarize"].tier == "frontier"
    assert parse(text).tiers["small"].price.input == Decimal("0.10")  # prices stay exact decimals


@pytest.mark.parametrize(
    ("samples", "agree", "saving", "reason"),
    [(20, 20, "5", "only 20 samples"), (100, 94, "5", "lower bound"), (250, 250, "0", "not cheaper")],
)
def test_suggest_keeps_a_task_without_enough_evidence(samples: int, agree: int, saving: str, reason: str) -> None:
    (move,) = judge(parse(POLICY), [row("categorization", "categorize", samples, agree, saving)], 0.9, 30)
    assert not move.moves and reason in move.reason


def test_suggest_narrows_a_route_that_served_a_task_that_does_not_qualify() -> None:
    policy = parse(POLICY)
    rows = [row("categorization", "categorize", 250, 250), row("classification", "categorize", 250, 100)]
    moves = judge(policy, rows, 0.95, 30)
    served = {"categorize": {"categorization", "classification"}}
    routes = parse(candidate(POLICY, policy, moves, served, "")).routes
    assert [(r.name, r.tier) for r in routes[:2]] == [
        ("categorize-categorization", "small"),
        ("categorize", "frontier"),
    ]
    assert routes[0].match.task == frozenset({"categorization"})


# --- the ramp ------------------------------------------------------------------------------------


def test_ramp_steps_split_the_moved_routes_by_prompt() -> None:
    cand = POLICY.replace("    tier: frontier\n    shadow: {tier: small, sample: 0.05}\n", "    tier: small\n", 1)
    moved = moved_routes(POLICY, cand)
    assert moved == [Moved("categorize", "frontier", "small")]
    route = parse(step_text(cand, moved, 10, "# step\n")).routes[0]
    assert route.split == (("small", 10), ("frontier", 90)) and route.split_prompt
    assert route.fallback == ("frontier",) and route.shadow is not None and route.shadow.tier == "frontier"


def test_ramp_guard_judges_only_with_enough_samples_and_only_when_confident() -> None:
    assert verdict(Watch(compared=5, agree=0), 0.9, 0.05, min_samples=10) is None
    assert "agreement 0/10" in (verdict(Watch(compared=10, agree=0), 0.9, 0.05, min_samples=10) or "")
    assert verdict(Watch(compared=10, agree=9), 0.9, 0.05, min_samples=10) is None  # 90% is not below
    assert "error rate" in (verdict(Watch(requests=20, errors=10), 0.9, 0.05, min_samples=10) or "")
    assert verdict(Watch(requests=20, errors=1), 0.9, 0.05, min_samples=10) is None
