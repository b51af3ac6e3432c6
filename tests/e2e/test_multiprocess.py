"""`gateway serve --workers N`: several processes share the port and each serves correctly."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, Sim, two_tier_policy

pytestmark = pytest.mark.e2e


def test_serve_with_two_processes(tmp_path: Path) -> None:
    small, frontier = Sim("tiny-small", tmp_path), Sim("tiny-frontier", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [frontier.url]))
    gw = Gateway(policy, tmp_path, None, "--workers", "2")
    try:
        with httpx.Client() as client:
            for _ in range(40):
                # a new connection each time, so the kernel spreads them over both processes
                r = httpx.post(
                    f"{gw.url}/v1/chat/completions",
                    json={"model": "auto", "messages": [{"role": "user", "content": "x"}]},
                )
                assert r.status_code == 200
            assert client.get(f"{gw.url}/readyz").status_code == 200
        pids = {json.loads(line)["request_id"][:12] for line in gw.log_lines() if '"event":"request"' in line}
        assert len(pids) == 2  # request ids carry a per-process prefix: both processes served
    finally:
        gw.stop()
        small.stop()
        frontier.stop()


def requests_counted(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gateway_requests_total{")
    )


def test_metrics_count_every_request_once_across_processes(tmp_path: Path) -> None:
    small, frontier = Sim("tiny-small", tmp_path), Sim("tiny-frontier", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [frontier.url]))
    gw = Gateway(policy, tmp_path, None, "--workers", "3")
    try:
        for i in range(60):
            body = {"model": "auto", "messages": [{"role": "user", "content": "x"}]}
            headers = {"x-gateway-task": "classification"} if i % 3 == 0 else {}
            assert httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers).status_code == 200
        served_by = {json.loads(x)["request_id"][:12] for x in gw.log_lines() if '"event":"request"' in x}
        assert len(served_by) >= 2  # the count below really spans processes
        for _ in range(6):  # new connections: scrapes land on different processes, all must agree
            text = httpx.get(gw.metrics_url).text
            assert requests_counted(text) == 60
            assert 'gateway_requests_total{outcome="ok",route="classify",status="200",tier="small"} 20.0' in text
            assert "gateway_policy_info{" in text and "gateway_request_duration_seconds_bucket{" in text
    finally:
        gw.stop()
        small.stop()
        frontier.stop()
