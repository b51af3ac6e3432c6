"""`gateway up --sim`: the whole local stack from one command, and gone again on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import ROOT, free_port, two_tier_policy

pytestmark = pytest.mark.e2e


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_sim_brings_everything_up_and_down(tmp_path: Path) -> None:
    small_port, frontier_port, gw_port, redis_port = free_port(), free_port(), free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    text = two_tier_policy([f"http://127.0.0.1:{small_port}"], [f"http://127.0.0.1:{frontier_port}"])
    policy.write_text(text.replace("auth: none\n", ""))  # real API keys: `up` starts Redis and makes one
    with (tmp_path / "up.log").open("wb") as errors:
        proc = subprocess.Popen(  # from tmp_path: up keeps a started Redis's data in ./.run/redis
            [sys.executable, "-m", "gateway.cli", "up", "--sim", "--policy", str(policy), "--port", str(gw_port)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=errors,
            env={**os.environ, "GATEWAY_LOG_FORMAT": "json", "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
        )
    assert proc.stdout is not None
    found: dict[str, str] = {}
    try:
        while "GATEWAY_API_KEY" not in found:  # bounded by the test time-out if it never comes
            line = proc.stdout.readline().decode()
            if not line:
                break
            if line.startswith(("GATEWAY_URL=", "GATEWAY_API_KEY=")):
                key, _, value = line.strip().partition("=")
                found[key] = value
        assert found.get("GATEWAY_URL") == f"http://127.0.0.1:{gw_port}", found
        r = httpx.post(
            f"{found['GATEWAY_URL']}/v1/chat/completions",
            headers={"authorization": f"Bearer {found['GATEWAY_API_KEY']}"},
            json={
                "model": "auto",
                "messages": [{"role": "user", "content": "hi"}],
                "metadata": {"task": "classification"},
            },
        )
        assert r.status_code == 200 and r.headers["x-gateway-tier"] == "small"
        assert all(listening(p) for p in (small_port, frontier_port, gw_port, redis_port))
        unauthenticated = httpx.post(f"{found['GATEWAY_URL']}/v1/chat/completions", json={"model": "auto"})
        assert unauthenticated.status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == 0
    time.sleep(0.2)
    assert not any(listening(p) for p in (small_port, frontier_port, gw_port, redis_port))


def test_up_refuses_an_invalid_policy(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 1\ntiers: {}\nroutes: []\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "up", "--sim", "--policy", str(policy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert f"{policy}:2: tiers: define at least one tier" in r.stderr
