"""Workers that register themselves in Redis (`discover: redis`): they join, and a dead one leaves."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, RedisServer, Sim, two_tier_policy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MSG = [{"role": "user", "content": "hi"}]


def test_registered_workers_join_and_lapsed_ones_leave(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    small = Sim("tiny-small", tmp_path)
    policy = tmp_path / "policy.yaml"
    text = two_tier_policy([small.url], [])
    policy.write_text(text.replace("    model: tiny-frontier\n", "    model: tiny-frontier\n    discover: redis\n"))
    gw = Gateway(policy, tmp_path, {"GATEWAY_REDIS_URL": redis_server.url})
    worker = None
    try:
        assert httpx.get(f"{gw.url}/readyz").status_code == 503  # no frontier worker yet
        worker = Sim(
            "tiny-frontier", tmp_path, "--register", redis_server.url, "--tier", "frontier", "--heartbeat-ttl", "2"
        )
        deadline = time.monotonic() + 3
        while httpx.get(f"{gw.url}/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG})
        assert r.status_code == 200 and r.headers["x-gateway-tier"] == "frontier"
        assert worker.stats()["completed"] == 1
        assert worker.proc is not None
        os.kill(worker.proc.pid, signal.SIGKILL)  # no goodbye: only the heartbeat lapses
        killed = time.monotonic()
        while httpx.get(f"{gw.url}/readyz").status_code != 503 and time.monotonic() - killed < 6:
            time.sleep(0.1)
        assert time.monotonic() - killed < 2 + 0.3  # within the TTL (the lease ends; no lookup needed)
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG})
        assert r.status_code in (502, 503)
    finally:
        gw.stop()
        small.stop()
        if worker is not None:
            worker.stop()
        redis_server.stop()
