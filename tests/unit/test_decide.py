"""The routing decision: a pure function over an immutable policy and a request's facts."""

from __future__ import annotations

import pytest

from gateway.errors import ContextTooLong, InvalidRequest, ModelNotFound, NoRouteMatched
from gateway.policy import decide, parse
from gateway.policy.decide import conditions
from tests.factories import facts

POLICY = parse(
    """version: 1
tiers:
  small: {model: s, price: {input: 0.1, output: 0.4}, max_context: 4096}
  medium: {model: m, price: {input: 1, output: 2}, max_context: 16000}
  frontier: {model: f, price: {input: 3, output: 15}}
routes:
  - name: classify
    match: {task: [classification, categorization]}
    tier: small
    fallback: [medium, frontier]
  - name: alias
    match: {model: [cheap]}
    tier: small
  - name: team
    match: {tenant: [search], header: {X-Priority: high}}
    tier: frontier
  - name: short-answers
    match: {max_tokens: {lte: 16}, stream: false}
    tier: small
  - name: legal
    match: {content_regex: "(?i)contract|lawsuit"}
    tier: frontier
  - name: long-prompt
    match: {prompt_tokens: {gt: 3000}}
    tier: frontier
  - name: default
    tier: medium
""",
    "p.yaml",
)


@pytest.mark.parametrize(
    ("kw", "route", "tier", "fallbacks"),
    [
        ({"task": "classification"}, "classify", "small", ("medium", "frontier")),
        ({"task": "summarization"}, "default", "medium", ()),
        ({"model": "cheap"}, "alias", "small", ()),
        ({"tenant": "search", "headers": {"x-priority": "high"}}, "team", "frontier", ()),
        ({"tenant": "search", "headers": {"x-priority": "low"}}, "default", "medium", ()),
        ({"tenant": "ads", "headers": {"x-priority": "high"}}, "default", "medium", ()),
        ({"max_tokens": 16}, "short-answers", "small", ()),
        ({"max_tokens": 16, "stream": True}, "default", "medium", ()),
        ({"max_tokens": 17}, "default", "medium", ()),
        ({"last_user_text": "Review this CONTRACT please"}, "legal", "frontier", ()),
        ({"prompt_tokens": 3001}, "long-prompt", "frontier", ()),
        ({"prompt_tokens": 3000}, "default", "medium", ()),
    ],
)
def test_first_matching_route_wins(kw: dict[str, object], route: str, tier: str, fallbacks: tuple[str, ...]) -> None:
    d = decide(POLICY, facts(**kw))
    assert (d.route, d.tier, d.fallbacks) == (route, tier, fallbacks)
    assert d.policy_revision == POLICY.revision


def test_tiers_whose_context_is_too_small_are_skipped() -> None:
    # small's max_context is 4096: a long classification prompt goes to the first fallback that fits.
    d = decide(POLICY, facts(task="classification", prompt_tokens=5000))
    assert (d.route, d.tier, d.fallbacks) == ("classify", "medium", ("frontier",))
    d = decide(POLICY, facts(task="classification", prompt_tokens=20000))
    assert (d.tier, d.fallbacks) == ("frontier", ())
    # the requested output counts against the context too
    d = decide(POLICY, facts(task="classification", prompt_tokens=4000, max_tokens=200))
    assert d.tier == "medium"


def test_route_with_no_fitting_tier_does_not_match() -> None:
    # "alias" has only the small tier: a prompt too long for it falls through to later routes.
    d = decide(POLICY, facts(model="cheap", prompt_tokens=5000))
    assert d.route == "long-prompt"


def test_unknown_model_is_404_model_not_found() -> None:
    with pytest.raises(ModelNotFound) as info:
        decide(POLICY, facts(model="gpt-5"))
    assert info.value.status == 404
    assert info.value.code == "model_not_found"
    assert "gpt-5" in info.value.message


def test_no_matching_route_is_a_clear_400() -> None:
    policy = parse(
        "version: 1\ntiers:\n  t: {model: m, price: {input: 1, output: 1}}\n"
        "routes:\n  - name: only\n    match: {task: [x]}\n    tier: t\n",
        "p.yaml",
    )
    with pytest.raises(NoRouteMatched) as info:
        decide(policy, facts())
    assert info.value.status == 400


def test_conditions_report_each_check() -> None:
    team = POLICY.routes[2]
    got = [(c.name, c.held) for c in conditions(team.match, facts(tenant="search", headers={"x-priority": "low"}))]
    assert got == [("tenant", True), ("header.x-priority", False)]


def test_decide_is_pure() -> None:
    f = facts(task="classification")
    assert decide(POLICY, f) == decide(POLICY, f)


def test_a_request_too_long_for_every_tier_of_its_route_says_so() -> None:
    policy = parse(
        "version: 1\ntiers:\n  s: {model: m, price: {input: 1, output: 1}, max_context: 4096}\n"
        "  f: {model: n, price: {input: 1, output: 1}, max_context: 32768}\n"
        "routes:\n  - {name: only, tier: s, fallback: [f]}\n",
        "p.yaml",
    )
    with pytest.raises(ContextTooLong) as info:
        decide(policy, facts(prompt_tokens=100, max_tokens=40_000))
    err = info.value
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "max_tokens")
    assert err.message == (
        "This request needs 40100 tokens of context (about 100 prompt tokens + max_tokens=40000); the largest "
        "context among the tiers of route 'only' is 32768. Shorten the prompt or lower max_tokens."
    )
    assert isinstance(err, NoRouteMatched)  # still "no route", for callers that only know that
    assert decide(policy, facts(prompt_tokens=100, max_tokens=30_000)).tier == "f"


def test_n_and_best_of_above_the_policys_max_n_are_a_400() -> None:
    assert POLICY.max_n == 128  # the default: OpenAI's own ceiling for n
    capped = parse(
        "version: 1\nmax_n: 4\ntiers:\n  t: {model: m, price: {input: 1, output: 1}}\n"
        "routes:\n  - {name: r, tier: t}\n",
        "p.yaml",
    )
    assert decide(capped, facts(completions=4)).route == "r"
    with pytest.raises(InvalidRequest) as info:
        decide(capped, facts(completions=5))
    assert (info.value.status, info.value.param) == (400, "n")
    assert info.value.message == "This request asks for 5 completions (n, best_of); at most 4 are allowed."
