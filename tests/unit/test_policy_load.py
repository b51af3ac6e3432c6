"""Policy loading: one bad_*.yaml fixture per error, each with its exact FILE:LINE: message."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy import PolicyError, load, parse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "policies"

EXPECTED = {
    "bad_unknown_key": ["9: tiers.small: unknown field 'max_contxt'"],
    "bad_unknown_top_level": ["2: unknown field 'limitz'"],
    "bad_unknown_tier_in_route": ["23: routes[1].tier: unknown tier 'huge'"],
    "bad_unknown_fallback_tier": ["19: routes[0].fallback[0]: unknown tier 'medium'"],
    "bad_bad_number": ["13: tiers.frontier.price.output: expected a number"],
    "bad_negative_price": ["7: tiers.small.price.input: must be at least 0"],
    "bad_bad_range": ["22: routes[1].match.prompt_tokens: no number satisfies gt 3000 and lt 100"],
    "bad_empty_range": ["22: routes[1].match.prompt_tokens: give at least one of gt, gte, lt, lte"],
    "bad_bad_regex": [
        "17: routes[0].match.content_regex: RE2, the linear-time engine content_regex runs on, cannot run this "
        "pattern: missing ): (unclosed"
    ],
    "bad_unreachable_route": [
        "26: routes[3]: route 'after-default' is unreachable: route 'default' (line 24) matches every request"
    ],
    "bad_match_all_not_last": [
        "18: routes[1]: route 'long-prompt' is unreachable: route 'classify' (line 15) matches every request",
        "22: routes[2]: route 'default' is unreachable: route 'classify' (line 15) matches every request",
    ],
    "bad_duplicate_route_name": ["20: routes[1].name: duplicate route name 'classify' (first at line 15)"],
    "bad_duplicate_tier": ["14: tiers.small: duplicate key 'small'"],
    "bad_missing_price": ["9: tiers.frontier: give a price, a gpu_hour price, or both"],
    "bad_gpu_hour_negative": ["13: tiers.frontier.gpu_hour.usd: must be at least 0"],
    "bad_gpu_hour_no_gpus": ["15: tiers.frontier.gpu_hour.gpus_per_worker: must be at least 1"],
    "bad_gpu_hour_unknown_key": ["13: tiers.frontier.gpu_hour: unknown field 'gpu'"],
    "bad_bad_version": ["1: version: unsupported policy version 2 (supported: 1)"],
    "bad_bad_max_context": ["8: tiers.small.max_context: must be greater than 0"],
    "bad_bad_worker_url": ["12: tiers.frontier.workers[0].url: not an http(s) URL: '127.0.0.1:8102'"],
    "bad_fallback_same_tier": ["19: routes[0].fallback[0]: tier 'small' is already tried earlier"],
    "bad_wrong_type_task": ["17: routes[0].match.task: expected array, got str"],
    "bad_unknown_endpoint": [
        "17: routes[0].match.endpoint: unknown endpoint 'chats' "
        "(known: chat, completions, embeddings, responses, messages, count_tokens, rerank, score, tokenize, detokenize)"
    ],
    "bad_invalid_yaml": [
        "25: invalid YAML: while parsing a flow sequence, expected ',' or ']', but got '<stream end>'"
    ],
    "bad_float_token_bound": ["22: routes[1].match.prompt_tokens.gt: expected int, got number"],
    "bad_limit_empty": ["27: limits[0]: give at least one of rpm, tpm, concurrency"],
    "bad_limit_negative": ["28: limits[0].rpm: must be greater than 0"],
    "bad_limit_tier_on_tenant_scope": ["28: limits[0].tier: only tier and tenant+tier limits name a tier"],
    "bad_limit_unknown_scope": ["27: limits[0].scope: must be one of key, tenant, tier, tenant+tier, not 'team'"],
    "bad_limit_unknown_tier": ["28: limits[0].tier: unknown tier 'huge'"],
    "bad_limit_zero_window": ["28: limits[0].tpm: must be greater than 0"],
    "bad_bad_on_redis_error": ["26: on_redis_error: must be one of fail_closed, fail_open, not 'shrug'"],
    "bad_bad_auth_mode": ["26: auth: must be one of api_key, none, not 'maybe'"],
    "bad_regex_backreference": [
        "17: routes[0].match.content_regex: RE2, the linear-time engine content_regex runs on, cannot run this "
        "pattern: invalid escape sequence: \\1 (RE2 has no backreferences or look-around, and repeats at most "
        "1000 times)"
    ],
    "bad_alias_bomb": ["7: more than 100000 values once aliases are expanded (an alias bomb?)"],
    "bad_deep_nesting": ["2: nested deeper than 64 levels"],
    "bad_recursive_alias": ["5: alias *tiers refers to a node that contains it"],
    "bad_too_large": ["1: the policy is 267828 bytes; at most 262144 are accepted"],
    "bad_unknown_tag": [
        "8: tiers.small.max_context: cannot read 'echo hi': could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object:os.system'"
    ],
    "bad_bad_max_n": ["26: max_n: must be a whole number of at least 1"],
    "bad_placement_unknown": ["7: tiers.small.placement: must be one of least_load, prefix, not 'nearest'"],
    "bad_max_inflight": [
        "7: tiers.small.workers[0].max_inflight: must be greater than 0",
        "8: tiers.small.max_inflight: must be greater than 0",
    ],
    "bad_spill_without_fallback": ["19: routes[0].spill_after_ms: a route spills to its fallback; give one"],
    "bad_priority_unknown": ["20: routes[0].priority: must be one of interactive, batch, not 'urgent'"],
    "bad_fairness": [
        "23: fairness.weights.acme: must be greater than 0",
        "24: fairness.key_priority.k1: must be one of interactive, batch, not 'soon'",
    ],
    "bad_queue_keys": [
        "8: tiers.small.scheduling_policy: must be one of fcfs, priority, not 'lottery'",
        "9: tiers.small.queue_timeout_ms: must be greater than 0",
        "26: fairness: unknown field 'tenants'",
    ],
    "bad_several": [
        "19: routes[0].fallback[0]: unknown tier 'medium'",
        "22: routes[1].match.prompt_tokens.gt: must be at least 0",
        "25: routes[2].tier: unknown tier 'nowhere'",
    ],
}


def test_every_bad_fixture_has_an_expected_message() -> None:
    assert {p.stem for p in FIXTURES.glob("bad_*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_policy_is_refused_with_exact_messages(name: str) -> None:
    path = FIXTURES / f"{name}.yaml"
    with pytest.raises(PolicyError) as info:
        load(path)
    assert info.value.problems == [f"{path}:{m}" for m in EXPECTED[name]]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_policy_check_prints_problems_and_exits_1(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = FIXTURES / f"{name}.yaml"
    with pytest.raises(SystemExit) as info:
        main(["policy", "check", str(path)])
    assert info.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{path}:{m}" for m in EXPECTED[name]]


def test_policy_check_exits_0_on_a_valid_policy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["policy", "check", str(FIXTURES / "good.yaml")])
    assert info.value.code == 0
    assert "ok (2 tiers, 3 routes" in capsys.readouterr().out


def test_shipped_policies_are_valid() -> None:
    from workers import profile

    shipped = sorted((Path(__file__).resolve().parents[2] / "policies").glob("*.yaml"))
    policies = [p for p in shipped if not p.name.endswith(".workers.yaml")]
    assert len(policies) >= 4
    for path in policies:
        load(path)
        if profile.beside(path).exists():  # its worker profiles cover its tiers
            assert set(profile.load(profile.beside(path))) == set(load(path).tiers)


def test_valid_policy_is_immutable_and_exact() -> None:
    policy = load(FIXTURES / "good.yaml")
    assert list(policy.tiers) == ["small", "frontier"]
    assert policy.tiers["small"].price.input == Decimal("0.10")  # exact decimal, never a float
    assert policy.tiers["small"].max_context == 4096
    assert [r.name for r in policy.routes] == ["classify", "long-prompt", "default"]
    assert policy.routes[0].fallback == ("frontier",)
    with pytest.raises(TypeError):
        policy.tiers["new"] = policy.tiers["small"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.routes = ()  # type: ignore[misc]


def test_unreadable_and_empty_files() -> None:
    with pytest.raises(PolicyError) as info:
        load("/nonexistent/policy.yaml")
    assert info.value.problems[0].startswith("/nonexistent/policy.yaml:1: cannot read policy:")
    with pytest.raises(PolicyError) as info:
        parse("", "empty.yaml")
    assert info.value.problems == ["empty.yaml:1: the policy is empty"]
    with pytest.raises(PolicyError) as info:
        parse("- a\n- b\n", "list.yaml")
    assert info.value.problems == ["list.yaml:1: a policy is a mapping with version, tiers and routes"]


def test_header_names_and_aliases_are_collected() -> None:
    policy = parse(
        """version: 1
tiers:
  t: {model: m, price: {input: 1, output: 2}}
routes:
  - name: a
    match: {header: {X-Team: search}, model: [fast, cheap]}
    tier: t
  - name: b
    tier: t
""",
        "p.yaml",
    )
    assert policy.header_names == frozenset({"x-team"})
    assert policy.aliases == frozenset({"fast", "cheap"})


def test_prices_change_on_their_effective_day_without_rewriting_history() -> None:
    policy = parse(
        """version: 1
tiers:
  t:
    model: m
    price:
      - {input: 1.00, output: 2.00}
      - {input: 0.50, output: 1.50, effective_from: 2026-11-20}
      - {input: 9.00, output: 9.00, effective_from: 2099-01-01}
routes:
  - {name: r, tier: t}
""",
        "p.yaml",
    )
    tier = policy.tiers["t"]
    import datetime

    def at(day: str) -> tuple[Decimal, Decimal]:
        ts = datetime.datetime.fromisoformat(day).replace(tzinfo=datetime.UTC).timestamp()
        p = tier.price_at(ts)
        return p.input, p.output

    assert at("2026-11-19T23:59:59") == (Decimal("1.00"), Decimal("2.00"))
    assert at("2026-11-20T00:00:00") == (Decimal("0.50"), Decimal("1.50"))
    assert at("2099-01-01T00:00:00") == (Decimal("9.00"), Decimal("9.00"))
    assert (tier.price.input, tier.price.output) == (Decimal("0.50"), Decimal("1.50"))  # in effect today


@pytest.mark.parametrize(
    ("price", "message"),
    [
        (
            "[{input: 1, output: 1, effective_from: 2099-01-01}]",
            "tiers.t.price: no price is in effect yet; give one without effective_from",
        ),
        (
            "[{input: 1, output: 1}, {input: 2, output: 2, effective_from: 2026-01-01}, "
            "{input: 3, output: 3, effective_from: 2026-01-01}]",
            "tiers.t.price: two prices take effect on the same day",
        ),
        ("[{input: 1, output: -1}]", "tiers.t.price[0].output: must be at least 0"),
    ],
)
def test_bad_price_lists(price: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse(
            f"version: 1\ntiers:\n  t:\n    model: m\n    price: {price}\nroutes:\n  - {{name: r, tier: t}}\n", "p.yaml"
        )
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [message]


def test_affinity_header_is_read_and_collected() -> None:
    policy = parse(
        "version: 1\ntiers:\n  t:\n    model: m\n    price: {input: 1, output: 1}\n"
        "    affinity: {header: X-Session-Id}\nroutes:\n  - {name: r, tier: t}\n",
        "p.yaml",
    )
    assert policy.tiers["t"].affinity_header == "x-session-id"
    assert "x-session-id" in policy.header_names
    with pytest.raises(PolicyError) as info:
        parse(
            "version: 1\ntiers:\n  t:\n    model: m\n    price: {input: 1, output: 1}\n    affinity: {cookie: s}\n"
            "routes:\n  - {name: r, tier: t}\n",
            "p.yaml",
        )
    assert info.value.problems == ["p.yaml:6: tiers.t.affinity: use {header: NAME}"]


def test_placement_keys_are_read() -> None:
    from gateway.policy import parse
    from gateway.policy.schema import Placement, Priority

    policy = parse(
        """version: 1
tiers:
  small:
    model: m
    price: {input: 1, output: 1}
    placement: prefix
    max_inflight: 4
    max_queue: 10
    queue_timeout_ms: 1500
    scheduling_policy: priority
    workers: [{url: "http://a:1", max_inflight: 8}, {url: "http://b:1"}]
  big:
    model: n
    price: {input: 1, output: 1}
routes:
  - {name: r, tier: small, fallback: [big], spill_after_ms: 250, priority: batch}
fairness:
  weights: {acme: 3}
  default_weight: 2
  key_priority: {k1: interactive}
""",
        "p.yaml",
    )
    small, big = policy.tiers["small"], policy.tiers["big"]
    assert small.placement is Placement.PREFIX and big.placement is Placement.LEAST_LOAD
    assert (small.capacity("http://a:1"), small.capacity("http://b:1")) == (8, 4)
    assert small.gated and not big.gated
    assert (small.max_queue, small.queue_timeout_s, small.engine_priority) == (10, 1.5, True)
    route = policy.routes[0]
    assert (route.spill_after_ms, route.priority) == (250, Priority.BATCH)
    assert (policy.fairness.weight("acme"), policy.fairness.weight("other")) == (3, 2)
    assert policy.fairness.key_priority["k1"] is Priority.INTERACTIVE
