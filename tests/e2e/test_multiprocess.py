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
