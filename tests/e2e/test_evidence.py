"""Evidence for tiering end to end, on real processes: a redis-server, two simulators whose answers
agree on categorization and not on summarization (``--answers prompt --diverge ^Summarize``), and
the gateway. Covers the per-task profile, the shadow calls' accounting (off the client's path,
billed to the platform), the agreement figures, ``policy suggest``, ``simulate --from-ledger``
and the guarded ramp — reaching 100%, and rolling itself back."""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.evidence import wilson
from gateway.ledger import STREAM, drops_key
from gateway.policy.load import parse
from tests.procs import Gateway, RedisServer, Sim, gateway_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

POLICY = """version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{small}"}}]
    price: {{input: 0.10, output: 0.40}}
    timeouts: {{connect: 1, first_byte: 10, idle: 5}}
  frontier:
    model: tiny-frontier
    workers: [{{url: "{frontier}"}}]
    price: {{input: 3.00, output: 15.00}}
routes:
  - name: categorize
    match: {{task: [categorization]}}
    tier: frontier
    shadow: {{tier: small, sample: 1, max_in_flight: 2}}
  - name: summarize
    match: {{task: [summarization]}}
    tier: frontier
    shadow: {{tier: small, sample: 1, max_in_flight: 2}}
  - name: default
    tier: frontier
"""
TASKS = {"categorization": ("Categorize", 3), "summarization": ("Summarize", 40)}


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.stack = contextlib.ExitStack()
        self.redis = RedisServer(tmp)
        self.stack.callback(self.redis.stop)
        self.small = Sim("tiny-small", tmp, "--answers", "prompt", "--diverge", "^Summarize")
        self.stack.callback(self.small.stop)
        self.frontier = Sim("tiny-frontier", tmp, "--answers", "prompt")
        self.stack.callback(self.frontier.stop)
        self.policy = tmp / "policy.yaml"
        self.policy.write_text(POLICY.format(small=self.small.url, frontier=self.frontier.url))
        self.env = {"GATEWAY_REDIS_URL": self.redis.url, "GATEWAY_ADMIN_TOKEN": "finance"}
        self.gateway: Gateway | None = None

    def start(self) -> Gateway:
        self.gateway = Gateway(self.policy, self.tmp, self.env)
        self.stack.callback(self.gateway.stop)
        return self.gateway

    def cli(self, *args: str) -> Any:
        return gateway_cli(self.env, *args)

    def json(self, *args: str) -> Any:
        out = self.cli(*args)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def export(self) -> list[dict[str, Any]]:
        out = self.cli("ledger", "export", "--format", "jsonl")
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    with s.stack:
        yield s


def ask(client: httpx.Client, url: str, task: str, i: int, stream: bool = False) -> httpx.Response:
    verb, max_tokens = TASKS[task]
    body = {
        "model": "auto",
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": f"{verb} article number {i} about the city council"}],
    }
    r = client.post(f"{url}/v1/chat/completions", json=body, headers={"x-gateway-task": task})
    assert r.status_code == 200, r.text
    return r


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.2)


def shadows_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["outcome"] == "shadow"]


def sampled(stack: Stack) -> int:
    """Shadow calls billed plus samples dropped, so far (read from Redis directly: the CLI is slow to start)."""
    client = redis.Redis.from_url(stack.redis.url)
    try:
        billed = sum(1 for _, fields in client.xrange(STREAM) if fields.get(b"outcome") == b"shadow")
        day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        dropped = sum(int(n) for n in client.hgetall(drops_key(day)).values())
    finally:
        client.close()
    return billed + dropped


def test_profile_shadow_accounting_agreement_suggest_and_simulate(stack: Stack) -> None:
    gw = stack.start()
    # 1. The shadow tier is slow (3 s per answer): the client's answer comes from the frontier while
    # its shadow is still running, and with two shadow calls in flight further samples are dropped.
    stack.small.faults(ttft_ms=3000)
    with httpx.Client(timeout=30) as client:
        for i in range(6):
            started = time.monotonic()
            ask(client, gw.url, "categorization", i)
            assert time.monotonic() - started < 3.0  # never the shadow's 3 s
            if i == 0:
                assert stack.small.stats()["completed"] == 0  # its shadow had not answered yet
        wait_for(lambda: sampled(stack) == 6)  # each sample either ran (and was billed) or was dropped
        assert 2 <= len(shadows_of(stack.export())) < 6  # at most two at a time: the rest were dropped
        stack.small.faults(ttft_ms=0)
        # 2. Enough traffic for evidence, streams among it (their answer is the relayed text).
        for i in range(6, 30):
            ask(client, gw.url, "categorization", i, stream=i % 3 == 0)
            ask(client, gw.url, "summarization", i, stream=i % 3 == 1)
    wait_for(lambda: sampled(stack) == 6 + 24 * 2)
    records = stack.export()
    client_records = [r for r in records if r["outcome"] != "shadow"]
    shadows = shadows_of(records)
    assert len(client_records) == 6 + 24 * 2
    assert {r["tenant"] for r in shadows} == {"(platform)"} and {r["tier"] for r in shadows} == {"small"}
    assert {r["tier"] for r in client_records} == {"frontier"}
    assert all(r["shadow_of"] in {c["request_id"] for c in client_records} for r in shadows)

    # The profile: client traffic per task, means and p95 from the aggregates, shares of the cost.
    profile = stack.json("ledger", "report", "--group-by", "task", "--format", "json")
    rows = {r["task"]: r for r in profile["rows"]}
    for task in TASKS:
        mine = [r for r in client_records if r["task"] == task]
        prompt = sorted(r["prompt_tokens"] for r in mine)
        output = sorted(r["completion_tokens"] for r in mine)
        assert rows[task]["requests"] == len(mine)
        assert rows[task]["mean_input"] == round(sum(prompt) / len(prompt), 1)
        assert rows[task]["p95_input"] == prompt[-(-95 * len(prompt) // 100) - 1]  # exact below 256 tokens
        assert rows[task]["mean_output"] == round(sum(output) / len(output), 1)
        assert Decimal(rows[task]["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in mine)
    assert float(sum(Decimal(r["share_pct"]) for r in profile["rows"])) == pytest.approx(100, abs=0.02)
    # shadow cost is reported apart, attributed to the platform, with the drops counted
    shadow_rows = {r["task"]: r for r in profile["shadow"]}
    for task in TASKS:
        mine = [r for r in shadows if r["task"] == task]
        assert shadow_rows[task]["requests"] == len(mine)
        assert Decimal(shadow_rows[task]["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in mine)
    assert shadow_rows["categorization"]["dropped"] >= 1
    by_tenant = stack.json("ledger", "report", "--group-by", "tenant,tier", "--format", "json")
    platform = [r for r in by_tenant if r["tenant"] == "(platform)"]
    assert [r["tier"] for r in platform] == ["small"]
    assert Decimal(platform[0]["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in shadows)
    assert all(r["tier"] == "frontier" for r in by_tenant if r["tenant"] != "(platform)")
    assert stack.cli("ledger", "verify").returncode == 0

    # Agreement: categorization's tiers agree on every comparison, summarization's on none.
    agreement = stack.json("ledger", "report", "--group-by", "task,tier", "--format", "json")
    admin = {"authorization": "Bearer finance"}
    api = httpx.get(f"{gw.url}/admin/ledger", params={"group_by": "task,tier"}, headers=admin).json()
    assert api["data"] == agreement["rows"] and api["shadow"] == agreement["shadow"]
    bad = httpx.get(f"{gw.url}/admin/ledger", params={"group_by": "task,colour"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    arows = {r["task"]: r for r in agreement["rows"]}
    for task, expected in (("categorization", 1.0), ("summarization", 0.0)):
        compared = [r for r in shadows if r["task"] == task and r["agree"] is not None]
        row = arows[task]
        assert row["shadow_tier"] == "small" and row["shadow_samples"] == len(compared)
        assert row["agreement"] == expected
        low, high = wilson(row["shadow_agree"], row["shadow_samples"])
        assert (row["agreement_low"], row["agreement_high"]) == (round(low, 4), round(high, 4))
        assert Decimal(row["saving_usd"]) > 0
    assert {r["comparator"] for r in shadows if r["task"] == "categorization"} == {"exact"}
    assert {r["comparator"] for r in shadows if r["task"] == "summarization"} == {"similarity"}

    # The suggestion moves exactly the agreeing task, and the candidate is a valid policy.
    out = stack.tmp / "candidate.yaml"
    policy = ["--policy", str(stack.policy)]
    r = stack.cli("policy", "suggest", *policy, "--min-agreement", "0.8", "--min-samples", "10", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "moves categorization -> small" in r.stdout and "predicted:" in r.stdout
    assert stack.cli("policy", "check", str(out)).returncode == 0
    candidate = {route.name: route for route in parse(out.read_text()).routes}
    assert candidate["categorize"].tier == "small" and candidate["categorize"].fallback == ("frontier",)
    assert candidate["categorize"].shadow is not None and candidate["categorize"].shadow.tier == "frontier"
    assert candidate["summarize"].tier == "frontier"
    # too few samples for the threshold: nothing moves
    r = stack.cli("policy", "suggest", *policy, "--min-samples", "1000", "--out", str(out))
    assert r.returncode == 0 and "moves nothing" in r.stdout
    assert parse(out.read_text()).routes[0].tier == "frontier"

    # simulate --from-ledger equals simulate on the same traffic exported to a file
    traffic = stack.tmp / "traffic.jsonl"
    traffic.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    common = ["policy", "simulate", "--policy", str(out), "--against", str(stack.policy), "--format", "json"]
    from_ledger = stack.json(*common, "--from-ledger")
    from_file = stack.json(*common, "--traffic", str(traffic))
    assert from_ledger == from_file
    assert from_ledger["lines"] == len(client_records) and from_ledger["shadow_lines"] == len(shadows)
    assert from_ledger["candidate"]["totals"]["unroutable"] == 0


def _traffic(url: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as client:
        i = 0
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                ask(client, url, "categorization", i)
            i += 1
            time.sleep(0.02)


def test_guarded_ramp_reaches_100_and_rolls_back(stack: Stack) -> None:
    assert stack.cli("policy", "apply", str(stack.policy), "-m", "all frontier").returncode == 0
    gw = stack.start()
    candidate = stack.tmp / "candidate.yaml"
    candidate.write_text(
        stack.policy.read_text().replace(
            "    tier: frontier\n    shadow: {tier: small, sample: 1, max_in_flight: 2}\n  - name: summarize",
            "    tier: small\n    fallback: [frontier]\n    shadow: {tier: frontier, sample: 1, max_in_flight: 2}\n"
            "  - name: summarize",
        )
    )
    assert parse(candidate.read_text()).routes[0].tier == "small"
    stop = threading.Event()
    sender = threading.Thread(target=_traffic, args=(gw.url, stop), daemon=True)
    sender.start()
    try:
        ramp = ["policy", "apply", str(candidate), "--ramp", "50,100", "--step-seconds", "2", "--step-samples", "3"]
        r = stack.cli(*ramp)
        assert r.returncode == 0, r.stderr
        assert "ramp complete" in r.stdout
        history = stack.cli("policy", "history").stdout
        assert "ramp step 1/2: categorize frontier->small at 50%" in history
        assert "ramp step 2/2: categorize frontier->small at 100%" in history
        assert "*v3" in history  # v1 all frontier, v2 at 50%, v3 the candidate itself
        wait_for(lambda: any(rec["tier"] == "small" and rec["outcome"] == "ok" for rec in stack.export()))

        # Back to all frontier; now the small tier answers categorization its own way: the ramp's
        # guard sees the agreement fall and rolls back by itself, and says so in the audit trail.
        assert stack.cli("policy", "rollback", "1").returncode == 0
        httpx.post(f"{stack.small.url}/sim/answers", json={"diverge": [["^Categorize", 1.0]]}).raise_for_status()
        r = stack.cli(*ramp[:-4], "--step-seconds", "60")
        assert r.returncode == 3, r.stdout + r.stderr
        assert "rolled back" in r.stderr and "agreement" in r.stderr
        history = stack.cli("policy", "history").stdout
        assert "ramp rolled back at step 1/2: agreement 0/" in history
        active = history.splitlines()[-1]
        assert active.startswith("*v6") and active.split()[5] == history.splitlines()[1].split()[5]  # v1's sha
    finally:
        stop.set()
        sender.join(timeout=30)
