"""Hostile policies: size, alias expansion and depth are refused before composing, fast and in
bounded memory; ``content_regex`` runs in linear time (RE2)."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from gateway.facts import RequestFacts
from gateway.policy import PolicyError, decide, parse
from gateway.policy.decide import conditions

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "policies"
GOOD = (FIXTURES / "good.yaml").read_text()


def refused(text: str) -> tuple[list[str], float, int]:
    """The problems, the seconds it took, and the peak memory it allocated (bytes)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PolicyError) as info:
            parse(text, "p.yaml")
        return info.value.problems, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_alias_bomb_is_refused_in_well_under_a_second_and_little_memory() -> None:
    bomb = (FIXTURES / "bad_alias_bomb.yaml").read_text()
    assert len(bomb) < 360  # the 351-byte "billion laughs" of issue 12, give or take the version line
    problems, seconds, peak = refused(bomb)
    assert problems == ["p.yaml:7: more than 100000 values once aliases are expanded (an alias bomb?)"]
    assert seconds < 0.1
    assert peak < 5_000_000


@pytest.mark.parametrize("depth", [65, 900, 5_000, 30_000])
def test_deep_yaml_is_refused_cleanly(depth: int) -> None:
    for text in (
        "version: 1\ntiers: " + "[" * depth + "]" * depth + "\n",  # flow
        "version: 1\ntiers: " + "{a: " * depth + "1" + "}" * depth + "\n",
        "version: 1\n" + "".join(" " * i + f"k{i}:\n" for i in range(min(depth, 700))),  # block (bytes grow as n²)
    ):
        problems, seconds, _ = refused(text)
        assert len(problems) == 1
        assert problems[0].endswith(": nested deeper than 64 levels"), problems
        assert seconds < 0.5


def test_a_64_deep_value_is_still_read() -> None:
    text = GOOD + "x: " + "[" * 63 + "]" * 63 + "\n"  # 64 with the top-level mapping
    problems, _, _ = refused(text)
    assert problems == ["p.yaml:26: unknown field 'x'"]  # past the bounds: an ordinary policy problem


def test_aliases_within_bounds_still_work() -> None:
    policy = parse(
        """version: 1
tiers:
  small: {model: a, price: &price {input: 0.10, output: 0.40}}
  large: {model: b, price: *price}
routes:
  - {name: r, tier: small}
""",
        "p.yaml",
    )
    assert policy.tiers["large"].price == policy.tiers["small"].price


def test_a_huge_policy_is_refused_before_it_is_read() -> None:
    text = GOOD + "#" * 10_000_000 + "\n"
    problems, seconds, _ = refused(text)
    assert problems == [f"p.yaml:1: the policy is {len(text)} bytes; at most 262144 are accepted"]
    assert seconds < 0.1


def facts(text: str) -> RequestFacts:
    return RequestFacts("t", None, "auto", 10, None, False, {}, last_user_text=text)


def regex_policy(pattern: str) -> str:
    return GOOD.replace("      task: [classification, categorization]", f"      content_regex: '{pattern}'")


def test_a_catastrophic_regex_answers_in_linear_time() -> None:
    policy = parse(regex_policy("(a+)+$"), "p.yaml")
    for n in (30, 100_000):
        started = time.perf_counter()
        decision = decide(policy, facts("a" * n + "b"))
        assert time.perf_counter() - started < 0.05
        assert decision.route == "default"  # no match: the text ends in "b"
    assert decide(policy, facts("aaaa")).route == "classify"


@pytest.mark.parametrize(
    ("pattern", "text", "found"),
    [
        (r"(?i)\bsummar(y|ize)\b", "Please SUMMARIZE this", True),
        (r"^\d{3}-\d{4}$", "555-1234", True),
        (r"^\pL+$", "grüß", True),  # RE2 syntax that Python's re lacks
        (r"^\p{L}{2,200}$", "grüß", True),
        (r"\p{Greek}", "abc", False),
        ("é+$", "café", True),  # non-ASCII text is matched as text, not bytes
        ("sports|politics", "neither", False),
    ],
)
def test_content_regex_keeps_its_meaning_on_re2(pattern: str, text: str, found: bool) -> None:
    policy = parse(regex_policy(pattern), "p.yaml")
    (cond,) = conditions(policy.routes[0].match, facts(text))
    assert cond.held is found
    assert cond.expected == pattern


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(?=x)y", "invalid perl operator: (?="),
        ("(?<!x)y", "invalid perl operator: (?<"),
        ("a{1001}", "invalid repetition size: {1001}"),
        ("(unclosed", "missing ): (unclosed"),
        # valid RE2 syntax (Python's re has no \p), but compiled it is over RE2's memory bound
        (r"\p{L}{1000}", "pattern too large - compile failed (compiled, it would take more than RE2's 8 MiB"),
        (r"\p{Foo}", "invalid character class range: \\p{Foo}"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_with_a_reason(pattern: str, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse(regex_policy(pattern), "p.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("p.yaml:17: routes[0].match.content_regex: RE2, the linear-time engine")
    assert reason in problem
    assert "position" not in problem  # never Python re's verdict ("bad escape \\p at position 0")
