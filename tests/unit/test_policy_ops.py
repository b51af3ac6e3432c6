"""Policy operations: the versioned store in Redis, split routes, explain, and simulate."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.policy import PolicyError, decide, parse
from gateway.policy.explain import explain, render_text
from gateway.policy.simulate import facts_of, render_table, simulate
from gateway.policy.store import ACTIVE, SEQ, PolicyStore
from gateway.store import connect
from tests.factories import facts

BASE = """version: 1
tiers:
  small: {model: s, price: {input: 0.10, output: 0.40}, max_context: 4096, default_max_tokens: 100}
  frontier: {model: f, price: {input: 3.00, output: 15.00}, default_max_tokens: 500}
routes:
  - name: classify
    match: {task: [classification, categorization]}
    tier: small
    fallback: [frontier]
  - name: default
    tier: frontier
"""


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[PolicyStore]:
    client = connect(redis_url, timeout_s=2)
    yield PolicyStore(client)
    await client.aclose()


# --- the store -------------------------------------------------------------------------------------


async def test_apply_history_diff_rollback(store: PolicyStore) -> None:
    v1, changed = await store.apply(BASE, source="p.yaml", author="ana", message="first")
    assert (v1.version, v1.previous, changed, v1.author, v1.message) == (1, 0, True, "ana", "first")
    assert v1.policy().revision == "v1"
    same, changed = await store.apply(BASE, source="p.yaml", author="ana")
    assert (same.version, changed) == (1, False)
    edited = BASE.replace("input: 0.10", "input: 0.20")
    v2, _ = await store.apply(edited, source="p.yaml", author="bo", message="small costs more")
    assert (v2.version, v2.previous) == (2, 1)
    assert [v.version for v in await store.history()] == [1, 2]
    assert (await store.active()) == v2
    diff = await store.diff(1, 2)
    assert "-  small: {model: s, price: {input: 0.10," in diff and "+  small: {model: s, price: {input: 0.20," in diff
    v3 = await store.rollback(1, author="cy")
    assert (v3.version, v3.previous, v3.sha256, v3.message) == (3, 2, v1.sha256, "rollback to v1")
    audit = await store.audit()
    assert [(a.version, a.previous, a.author) for a in audit] == [(1, 0, "ana"), (2, 1, "bo"), (3, 2, "cy")]
    assert "+  small: {model: s, price: {input: 0.20," in audit[1].diff
    with pytest.raises(KeyError):
        await store.rollback(99, author="x")


async def test_invalid_policy_changes_nothing(store: PolicyStore) -> None:
    await store.apply(BASE, source="p.yaml", author="ana")
    before = (await store.redis.get(SEQ), await store.redis.get(ACTIVE), len(await store.audit()))
    with pytest.raises(PolicyError) as info:
        await store.apply(BASE.replace("tier: frontier\n", "tier: nowhere\n"), source="bad.yaml", author="x")
    assert info.value.problems == ["bad.yaml:11: routes[1].tier: unknown tier 'nowhere'"]
    assert (await store.redis.get(SEQ), await store.redis.get(ACTIVE), len(await store.audit())) == before


async def test_apply_publishes_the_new_version(store: PolicyStore, redis_url: str) -> None:
    listener = aioredis.Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    await pubsub.subscribe("gw:policy:changed")
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    await store.apply(BASE, source="p.yaml", author="ana")
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None and message["data"] == b"1"
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await listener.aclose()


# --- split routes ----------------------------------------------------------------------------------

SPLIT = BASE.replace(
    "  - name: default\n    tier: frontier\n",
    "  - name: canary\n    match: {task: [summarization]}\n    split: {small: 90, frontier: 10}\n    split_by: tenant\n"
    "    fallback: [frontier]\n"
    "  - name: by-user\n    match: {task: [seo]}\n    split: {small: 50, frontier: 50}\n"
    "    split_by: {header: X-User}\n"
    "  - name: default\n    tier: frontier\n",
)


def test_split_proportions_over_10000_callers() -> None:
    policy = parse(SPLIT, "split.yaml")
    sides = [decide(policy, facts(task="summarization", tenant=f"tenant-{i}")).tier for i in range(10_000)]
    small = sides.count("small")
    # binomial(10000, 0.9): sd = 30; six sd either way
    assert 9000 - 180 < small < 9000 + 180, small


def test_split_is_sticky_per_caller_and_recorded() -> None:
    policy = parse(SPLIT, "split.yaml")
    for i in range(50):
        f = facts(task="summarization", tenant=f"t{i}")
        first = decide(policy, f)
        assert all(decide(policy, f) == first for _ in range(3))
        assert first.split_side == first.tier
        assert first.fallbacks == (() if first.tier == "frontier" else ("frontier",))
    by_header = {decide(policy, facts(task="seo", headers={"x-user": f"u{i}"})).tier for i in range(40)}
    assert by_header == {"small", "frontier"}
    assert "x-user" in policy.header_names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("    split: {small: 90, huge: 10}\n", "routes[1].split: unknown tier 'huge'"),
        ("    split: {small: 90, frontier: 0}\n", "routes[1].split.frontier: weight must be greater than 0"),
        ("    tier: small\n    split: {small: 1}\n", "routes[1]: give either tier or split, not both"),
        (
            "    split: {small: 1}\n    split_by: {cookie: x}\n",
            "routes[1].split_by: use 'tenant', 'prompt' or {header: NAME}",
        ),
        ("    tier: small\n    split_by: tenant\n", "routes[1].split_by: only a route with a split has one"),
    ],
)
def test_bad_splits(text: str, message: str) -> None:
    bad = BASE.replace(
        "  - name: default\n    tier: frontier\n",
        "  - name: x\n    match: {task: [y]}\n" + text + "  - name: default\n    tier: frontier\n",
    )
    with pytest.raises(PolicyError) as info:
        parse(bad, "b.yaml")
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [message]


# --- explain -------------------------------------------------------------------------------------

EXPLAIN = """version: 1
tiers:
  small: {model: s, price: {input: 0.10, output: 0.40}, max_context: 1000, default_max_tokens: 100}
  frontier: {model: f, price: {input: 3.00, output: 15.00}}
routes:
  - name: everything
    match:
      task: [classification]
      model: [cheap]
      tenant: [media]
      prompt_tokens: {lt: 500}
      max_tokens: {lte: 50}
      stream: false
      header: {X-Team: news}
      content_regex: "(?i)category"
    tier: small
  - name: default
    tier: frontier
"""


def test_explain_reports_every_condition() -> None:
    policy = parse(EXPLAIN, "e.yaml")
    f = facts(
        task="classification",
        model="cheap",
        tenant="media",
        prompt_tokens=200,
        max_tokens=80,
        headers={"x-team": "news"},
        last_user_text="Pick a Category",
    )
    e = explain(policy, f)
    first = e.routes[0]
    assert [(c.name, c.held) for c in first.conditions] == [
        ("task", True),
        ("model", True),
        ("tenant", True),
        ("prompt_tokens", True),
        ("max_tokens", False),
        ("stream", True),
        ("header.x-team", True),
        ("content_regex", True),
    ]
    assert first.conditions[4].expected == "lte 50" and first.conditions[4].actual == 80
    assert not first.matched and e.routes[1].matched
    assert e.decision is not None and (e.decision.route, e.decision.tier) == ("default", "frontier")
    # 200 input at $3/M + 80 output at $15/M
    assert Decimal(e.estimated_cost_usd or "0") == Decimal("0.0018")
    assert e.output_estimate_from == "max_tokens"
    text = render_text(e)
    assert "✗ max_tokens: wants lte 50, got 80" in text and "→ route default, tier frontier" in text


def test_explain_shows_context_and_default_output() -> None:
    policy = parse(EXPLAIN.replace("      max_tokens: {lte: 50}\n", ""), "e.yaml")
    f = facts(
        task="classification",
        model="cheap",
        tenant="media",
        prompt_tokens=400,
        headers={"x-team": "news"},
        last_user_text="category",
    )
    e = explain(policy, f)
    assert e.routes[0].matched and e.decision is not None and e.decision.tier == "small"
    assert e.output_tokens_estimate == 100 and e.output_estimate_from == "default_max_tokens"
    assert Decimal(e.estimated_cost_usd or "0") == Decimal("0.00008")  # 400 x 0.10/M + 100 x 0.40/M


def test_explain_counts_every_completion_in_the_output_estimate() -> None:
    policy = parse(EXPLAIN, "e.yaml")
    one = explain(policy, facts(prompt_tokens=10, max_tokens=40))
    four = explain(policy, facts(prompt_tokens=10, max_tokens=40, completions=4))
    assert (one.output_tokens_estimate, four.output_tokens_estimate) == (40, 160)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"body": {"model": "auto", "prompt": "x"}, "headers": [None, None]},
            "got `array` - at `$.headers`",
        ),
        ({"body": {"model": "auto", "prompt": "x"}, "headers": {"x-a": 1}}, "Expected `str`, got `int`"),
        ({"body": [1], "tenant": "t"}, "Expected `object | null`, got `array`"),
        ({"body": {"model": "auto", "prompt": "x"}, "tenant": 5}, "Expected `str | null`, got `int`"),
        ({"prompt_tokens": "many", "completion_tokens": 1}, "Expected `int`, got `str`"),
        ({"prompt_tokens": 1, "completion_tokens": 1, "max_tokens": "x"}, "Expected `int | null`, got `str`"),
    ],
)
def test_traffic_lines_of_the_wrong_shape_are_value_errors(line: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        facts_of(line)


# --- simulate ------------------------------------------------------------------------------------


def chat(task: str | None, prompt: str, max_tokens: int | None = None, tenant: str = "media") -> str:
    body: dict[str, object] = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    line: dict[str, object] = {"body": body, "tenant": tenant}
    if task:
        line["headers"] = {"x-gateway-task": task}
    return json.dumps(line)


def test_simulate_matches_a_hand_computation(tmp_path: Path) -> None:
    """The media example in miniature: summaries, categories and SEO copy; move categories to small."""
    current = tmp_path / "current.yaml"
    current.write_text(BASE.replace("tier: small\n    fallback: [frontier]\n", "tier: frontier\n", 1))
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(BASE)
    from gateway import tokens

    prompt = "hello world"  # 2 tokens; chat framing adds 3 + 1 ("user") + 3 = 9 tokens in all
    assert tokens.count_text(prompt) == 2
    traffic = tmp_path / "traffic.jsonl"
    lines = [chat("summarization", prompt, 200)] * 4 + [chat("categorization", prompt, 50)] * 6
    lines += [
        json.dumps(
            {
                "tenant": "media",
                "task": "categorization",
                "model": "auto",
                "prompt_tokens": 400,
                "completion_tokens": 50,
            }
        )
    ]  # a ledger record: recorded counts
    lines += ["not json", chat("categorization", prompt)]  # an invalid line; one with no max_tokens
    traffic.write_text("\n".join(lines) + "\n")
    r = simulate(str(candidate), str(traffic), str(current))
    assert r["lines"] == 13 and r["invalid_lines"] == 1
    assert r["output_tokens_from"] == {"max_tokens": 10, "recorded": 1, "default_max_tokens": 1}
    cand, cur = r["candidate"], r["current"]
    # candidate: 4 summaries on frontier; 6+1+1 categories on small
    assert cand["by_tier"]["frontier"] == {
        "requests": 4,
        "input_tokens": 36,
        "output_tokens": 800,
        "cost_usd": (Decimal(36) * 3 + Decimal(800) * 15) / 1_000_000,
    }
    small_in, small_out = 6 * 9 + 400 + 9, 6 * 50 + 50 + 100
    assert cand["by_tier"]["small"]["input_tokens"] == small_in
    assert cand["by_tier"]["small"]["output_tokens"] == small_out
    cand_cost = (
        Decimal(36) * 3 + Decimal(800) * 15 + Decimal(small_in) * Decimal("0.10") + Decimal(small_out) * Decimal("0.40")
    ) / 1_000_000
    assert cand["totals"]["cost_usd"] == cand_cost
    # current: everything on frontier; the categorization without max_tokens takes frontier's default (500)
    cur_cost = (Decimal(36 + small_in) * 3 + Decimal(800 + 6 * 50 + 50 + 500) * 15) / 1_000_000
    assert cur["totals"]["cost_usd"] == cur_cost
    assert r["difference"]["cost_usd"] == cand_cost - cur_cost
    assert r["difference"]["cost_pct"] == ((cand_cost - cur_cost) / cur_cost * 100).quantize(Decimal("0.01"))
    assert r["moved"] == []  # same route names: categories stayed on "classify", only its tier changed
    table = render_table(r)
    assert "difference: -$" in table and "classify" in table


def test_simulate_counts_moves_between_routes(tmp_path: Path) -> None:
    current = tmp_path / "current.yaml"
    current.write_text(BASE.replace("[classification, categorization]", "[classification]"))
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(BASE)
    traffic = tmp_path / "t.jsonl"
    traffic.write_text("\n".join([chat("categorization", "x", 10)] * 3 + [chat("classification", "x", 10)]) + "\n")
    r = simulate(str(candidate), str(traffic), str(current))
    assert r["moved"] == [{"from": "default", "to": "classify", "requests": 3}]


def test_the_media_companys_worked_example(tmp_path: Path) -> None:
    """5,000 articles a day, three calls each: 11 M tokens. Categorization to the small tier saves 16.58%."""
    root = Path(__file__).resolve().parents[2]
    calls = [("summarization", 800, 200), ("categorization", 400, 50), ("seo", 600, 150)]
    traffic = tmp_path / "media-day.jsonl"
    traffic.write_text(
        "".join(
            json.dumps({"tenant": "media", "task": t, "model": "auto", "prompt_tokens": p, "completion_tokens": c})
            + "\n"
            for _ in range(5000)
            for t, p, c in calls
        )
    )
    r = simulate(str(root / "policies/content-pipeline.yaml"), str(traffic), str(root / "policies/all-frontier.yaml"))
    cur, cand = r["current"]["totals"], r["candidate"]["totals"]
    assert cur["input_tokens"] + cur["output_tokens"] == 11_000_000
    assert cur["cost_usd"] == Decimal("57")  # 9 M in at $3/M + 2 M out at $15/M
    assert cand["cost_usd"] == Decimal("47.55")  # categorization: 2 M in at $0.10, 0.25 M out at $0.40
    assert r["candidate"]["by_tier"]["small"]["requests"] == 5000
    assert r["difference"] == {"cost_usd": Decimal("-9.45"), "cost_pct": Decimal("-16.58")}
    assert r["moved"] == []  # same route, cheaper tier


async def test_versions_stored_under_the_old_names_are_renamed_once(redis_url: str) -> None:
    """Before the {policy} hash tag (for Redis Cluster) versions lived at gw:policy:*; a store on one
    Redis moves them, once, and keeps numbering after them."""
    client = connect(redis_url, timeout_s=5)
    try:
        text = BASE
        record = {"sha256": "x", "yaml": text, "author": "old", "time": 1.0, "message": "", "source": "p.yaml"}
        await client.set("gw:policy:seq", 1)
        await client.hset("gw:policy:versions", "1", json.dumps({**record, "version": 1, "previous": 0}))
        await client.set("gw:policy:active", 1)
        await client.xadd("gw:policy:audit", {"version": 1, "previous": 0})
        store = PolicyStore(client)
        active = await store.active()
        assert active is not None and active.version == 1 and active.author == "old"
        assert await client.exists("gw:policy:seq", "gw:policy:versions", "gw:policy:active", "gw:policy:audit") == 0
        assert await client.get(SEQ) == b"1" and await client.get(ACTIVE) == b"1"
        new, _ = await store.apply(text + "# changed\n", source="p.yaml", author="me")
        assert new.version == 2 and new.previous == 1
        assert await PolicyStore(client).active() == new  # a second store finds nothing left to move
    finally:
        await client.aclose()
