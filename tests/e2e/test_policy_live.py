"""Live policy changes: three replicas on one Redis follow `gateway policy apply`, rollback, --watch."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import ClusterServer, Gateway, Replicas, cluster_if_asked, gateway_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MSG = [{"role": "user", "content": "hello"}]

POLICY = """version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{small}"}}]
    price: {{input: 0.10, output: 0.40}}
  frontier:
    model: tiny-frontier
    workers: [{{url: "{frontier}"}}]
    price: {{input: 3.00, output: 15.00}}
routes:
  - name: default
    tier: {tier}
"""


class Stack(Replicas):
    def __init__(self, tmp: Path, redis: ClusterServer | None = None):
        super().__init__(tmp, {"GATEWAY_AUTHOR": "tests"}, redis)
        self.to_frontier = self.write("a.yaml", "frontier")
        self.to_small = self.write("b.yaml", "small")
        self.start(self.to_frontier)

    def write(self, name: str, tier: str) -> Path:
        path = self.tmp / name
        path.write_text(POLICY.format(small=self.small.url, frontier=self.frontier.url, tier=tier))
        return path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return gateway_cli(self.env, *args)

    def revisions(self) -> list[str]:
        return [httpx.get(f"{g.url}/readyz").json()["policy"]["revision"] for g in self.gateways]


@pytest.fixture(scope="module", params=["redis"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Three replicas on one redis-server; or, for tests parametrized with ``cluster``, on the
    session's Redis Cluster (versions, audit and pub/sub announcements across its nodes)."""
    s = Stack(tmp_path_factory.mktemp("live"), cluster_if_asked(request))
    yield s
    s.stop()


ON_BOTH = pytest.mark.parametrize("stack", ["redis", "cluster"], indirect=True)


def wait_for(stack: Stack, revision: str, within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if stack.revisions() == [revision] * 3:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"replicas at {stack.revisions()}, wanted {revision} within {within}s")


def tier_of(gw: Gateway) -> str:
    return httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG}).headers[
        "x-gateway-tier"
    ]


@ON_BOTH
def test_apply_reaches_every_replica_within_a_second_and_in_flight_requests_keep_their_version(
    stack: Stack,
) -> None:
    assert {tier_of(g) for g in stack.gateways} == {"frontier"}
    stack.frontier.faults(ttft_ms=1500)
    in_flight: dict[str, str] = {}

    def slow_request() -> None:
        r = httpx.post(
            f"{stack.gateways[0].url}/v1/chat/completions", json={"model": "auto", "messages": MSG}, timeout=30
        )
        in_flight["tier"] = r.headers["x-gateway-tier"]
        in_flight["id"] = r.headers["x-gateway-request-id"]

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.3)
    applied = stack.cli("policy", "apply", str(stack.to_small), "--message", "classify everything small")
    assert applied.returncode == 0, applied.stderr
    assert "as v1" in applied.stdout
    assert wait_for(stack, "v1", 1.0) <= 1.0
    assert {tier_of(g) for g in stack.gateways} == {"small"}
    t.join()
    stack.frontier.faults(ttft_ms=0)
    assert in_flight["tier"] == "frontier"  # served entirely under the version it started with
    line = next(json.loads(x) for x in stack.gateways[0].log_lines() if in_flight["id"] in x and '"request"' in x)
    assert line["policy"] != "v1"


@ON_BOTH
def test_invalid_policy_is_refused_and_no_replica_changes(stack: Stack) -> None:
    before = stack.revisions()
    bad = stack.tmp / "bad.yaml"
    bad.write_text(stack.to_small.read_text().replace("tier: small\n", "tier: medium\n"))
    r = stack.cli("policy", "apply", str(bad))
    assert r.returncode == 1
    assert r.stderr.strip() == f"{bad}:14: routes[0].tier: unknown tier 'medium'"
    time.sleep(1.0)
    assert stack.revisions() == before


@ON_BOTH
def test_history_diff_rollback(stack: Stack) -> None:
    assert stack.cli("policy", "apply", str(stack.to_frontier), "-m", "back").returncode == 0
    wait_for(stack, "v2", 1.0)
    history = stack.cli("policy", "history").stdout
    assert "*v2" in history and "tests" in history and "classify everything small" in history
    diff = stack.cli("policy", "diff", "1", "2").stdout
    assert "-    tier: small" in diff and "+    tier: frontier" in diff
    r = stack.cli("policy", "rollback", "1")
    assert r.returncode == 0 and "as v3" in r.stdout
    wait_for(stack, "v3", 1.0)
    assert {tier_of(g) for g in stack.gateways} == {"small"}


@ON_BOTH
def test_a_new_replica_takes_the_newer_version_from_redis(stack: Stack, tmp_path: Path) -> None:
    late = Gateway(stack.to_frontier, tmp_path, stack.env)  # its file says frontier; Redis says v3 (small)
    try:
        assert httpx.get(f"{late.url}/readyz").json()["policy"]["revision"] == "v3"
        assert tier_of(late) == "small"
        assert any('"policy_from_redis"' in x for x in late.log_lines())
    finally:
        late.stop()


@ON_BOTH
def test_admin_policy_endpoints(stack: Stack, tmp_path: Path) -> None:
    gw = Gateway(stack.to_frontier, tmp_path, {**stack.env, "GATEWAY_ADMIN_TOKEN": "adm"})
    admin = {"authorization": "Bearer adm"}
    try:
        current = httpx.get(f"{gw.url}/admin/policy", headers=admin).json()
        assert current["revision"] == "v3" and "tier: small" in current["yaml"]
        bad = httpx.put(f"{gw.url}/admin/policy", content=b"version: 1\ntiers: {}\n", headers=admin)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_policy"
        assert bad.json()["error"]["problems"] == [
            "PUT /admin/policy:1: routes: define at least one route as a list",
            "PUT /admin/policy:2: tiers: define at least one tier as a mapping of name to tier",
        ]
        ok = httpx.put(
            f"{gw.url}/admin/policy",
            content=stack.to_frontier.read_bytes(),
            headers=admin,
            params={"message": "via api", "author": "ops"},
        )
        assert ok.json() == {"version": 4, "changed": True}
        wait_for(stack, "v4", 1.0)
        explained = httpx.post(
            f"{gw.url}/admin/route/explain",
            headers=admin,
            json={"body": {"model": "auto", "messages": MSG}, "tenant": "media"},
        ).json()
        assert explained["decision"]["route"] == "default" and explained["decision"]["tier"] == "frontier"
        assert explained["routes"][0]["matched"] is True and explained["facts"]["tenant"] == "media"
        assert httpx.get(f"{gw.url}/admin/policy").status_code == 401
    finally:
        gw.stop()


def test_watch_refuses_a_broken_edit_and_takes_the_fixed_one(stack: Stack, tmp_path: Path) -> None:
    policy = tmp_path / "watched.yaml"
    text = stack.to_frontier.read_text()
    policy.write_text(text)
    redis_less = {"GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing applied there: the file rules
    gw = Gateway(policy, tmp_path, redis_less, "--watch")
    try:
        first = httpx.get(f"{gw.url}/readyz").json()["policy"]["revision"]
        policy.write_text(text.replace("tier: frontier\n", "tier: nowhere\n"))
        time.sleep(1.2)
        assert httpx.get(f"{gw.url}/readyz").json()["policy"]["revision"] == first  # last good version kept
        assert tier_of(gw) == "frontier"
        refused = [json.loads(x) for x in gw.log_lines() if '"policy_reload_refused"' in x]
        assert refused and refused[0]["problems"] == [f"{policy}:14: routes[0].tier: unknown tier 'nowhere'"]
        policy.write_text(text.replace("tier: frontier\n", "tier: small\n"))
        deadline = time.monotonic() + 3
        while tier_of(gw) != "small" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tier_of(gw) == "small"
    finally:
        gw.stop()


def test_explain_and_simulate_commands(stack: Stack, tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": "auto", "messages": MSG, "max_tokens": 10}))
    r = stack.cli("policy", "explain", "--policy", str(stack.to_small), "--request", str(req), "--tenant", "media")
    assert r.returncode == 0 and "→ route default, tier small" in r.stdout and "tenant=media" in r.stdout
    r = stack.cli("policy", "explain", "--policy", str(stack.to_small), "--request", str(req), "--format", "json")
    assert json.loads(r.stdout)["decision"]["tier"] == "small"
    traffic = tmp_path / "t.jsonl"
    traffic.write_text("\n".join(json.dumps({"model": "auto", "messages": MSG, "max_tokens": 10}) for _ in range(5)))
    r = stack.cli(
        "policy",
        "simulate",
        "--policy",
        str(stack.to_small),
        "--traffic",
        str(traffic),
        "--against",
        str(stack.to_frontier),
        "--format",
        "json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (
        out["candidate"]["by_tier"]["small"]["requests"] == 5 and out["current"]["by_tier"]["frontier"]["requests"] == 5
    )
    assert float(out["difference"]["cost_pct"]) < -90
