"""`gateway up --sim`: the whole local stack from one command, and gone again on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from tests.procs import ROOT, RedisServer, free_port, two_tier_policy
from tests.vllm_stack import profiles_yaml

pytestmark = pytest.mark.e2e


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_up(
    tmp_path: Path, policy: Path, gw_port: int, redis_port: int | None, *flags: str
) -> subprocess.Popen[bytes]:
    """``redis_port``: the Redis named by GATEWAY_REDIS_URL; None: name none (up starts its own)."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    if redis_port is not None:
        env["GATEWAY_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    with (tmp_path / "up.log").open("wb") as errors:
        return subprocess.Popen(  # from tmp_path: up keeps a started Redis's data in ./.run/redis
            [sys.executable, "-m", "gateway.cli", "up", *flags, "--policy", str(policy), "--port", str(gw_port)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=errors,
            env={
                **env,
                "GATEWAY_LOG_FORMAT": "json",
                "GATEWAY_METRICS_PORT": str(free_port()),  # not the default: other gateways may run on this host
            },
        )


def read_endpoint(proc: subprocess.Popen[bytes]) -> dict[str, str]:
    """The shell-usable ``export GATEWAY_…=…`` lines of `up`'s output."""
    assert proc.stdout is not None
    found: dict[str, str] = {}
    while "GATEWAY_REDIS_URL" not in found:  # bounded by the test time-out if it never comes
        line = proc.stdout.readline().decode()
        if not line:
            break
        if line.startswith("export GATEWAY_"):
            key, _, value = line.removeprefix("export ").strip().partition("=")
            found[key] = value
    return found


def interrupt(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Ctrl-C, and wait for `up` to have stopped everything."""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=timeout)
    if proc.stdout is not None:
        proc.stdout.close()
    time.sleep(0.3)  # sockets of the stopped processes close


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_up_sim_brings_everything_up_and_down(tmp_path: Path) -> None:
    """No Redis named: `up` starts one of its own (never the one at the default address), prints
    export lines and writes them to --env-file, logs requests to .run/gateway.log and shows a
    one-line summary; Ctrl-C stops everything it started."""
    small_port, frontier_port, gw_port = free_port(), free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    text = two_tier_policy([f"http://127.0.0.1:{small_port}"], [f"http://127.0.0.1:{frontier_port}"])
    policy.write_text(text.replace("auth: none\n", ""))  # real API keys: `up` starts Redis and makes one
    env_file = tmp_path / "gw.env"
    proc = start_up(tmp_path, policy, gw_port, None, "--sim", "--env-file", str(env_file))
    assert proc.stdout is not None
    try:
        found = read_endpoint(proc)
        assert found.get("GATEWAY_URL") == f"http://127.0.0.1:{gw_port}", found
        redis_port = urlsplit(found["GATEWAY_REDIS_URL"]).port
        assert redis_port and redis_port != 6379, found  # its own, not the machine's
        assert env_file.read_text() == "".join(f"export {k}={v}\n" for k, v in found.items())
        assert env_file.stat().st_mode & 0o777 == 0o600  # it holds the key
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
        log = tmp_path / ".run" / "gateway.log"
        wait_for(lambda: (tmp_path / "up.log").read_text().count("requests 2 (ok 1, 4xx 1"), 10, "the summary")
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert r.headers["x-gateway-request-id"] in {e.get("request_id") for e in lines if e["event"] == "request"}
        assert "by tier: small 1" in (tmp_path / "up.log").read_text()
    finally:
        interrupt(proc, timeout=30)
    assert proc.returncode == 0
    assert not any(listening(p) for p in (small_port, frontier_port, gw_port, redis_port))


def test_up_says_when_it_uses_a_redis_it_did_not_start(tmp_path: Path) -> None:
    """A Redis named by GATEWAY_REDIS_URL that answers is used, with a notice; its key lands there
    and it is left running on Ctrl-C."""
    small_port, frontier_port, gw_port = free_port(), free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    text = two_tier_policy([f"http://127.0.0.1:{small_port}"], [f"http://127.0.0.1:{frontier_port}"])
    policy.write_text(text.replace("auth: none\n", ""))
    (tmp_path / "theirs").mkdir()
    theirs = RedisServer(tmp_path / "theirs")
    client = redis.Redis(port=theirs.port)
    try:
        proc = start_up(tmp_path, policy, gw_port, theirs.port, "--sim")
        try:
            found = read_endpoint(proc)
            assert found["GATEWAY_REDIS_URL"] == f"redis://127.0.0.1:{theirs.port}/0"
            notice = (tmp_path / "up.log").read_text()
            assert f"using the Redis at redis://127.0.0.1:{theirs.port}/0, which gateway up did not start" in notice
            assert client.scard("gw:keys") == 1, "the API key was not made in the named Redis"
        finally:
            interrupt(proc, timeout=30)
        assert proc.returncode == 0
        assert client.ping()  # not stopped: up did not start it
    finally:
        client.close()
        theirs.stop()
    assert not any(listening(p) for p in (small_port, frontier_port, gw_port))


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


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_up_brings_up_real_vllm_workers_per_tier(tmp_path: Path, tiny_models: Path) -> None:
    small_port, frontier_port, gw_port, redis_port = free_port(), free_port(), free_port(), free_port()
    policy = tmp_path / "stack.yaml"
    text = two_tier_policy([f"http://127.0.0.1:{small_port}"], [f"http://127.0.0.1:{frontier_port}"])
    policy.write_text(text.replace("auth: none\n", "").replace("first_byte: 2, idle: 1", "first_byte: 30, idle: 30"))
    # the worker profiles beside the policy (stack.yaml -> stack.workers.yaml), serving the tiny models
    (tmp_path / "stack.workers.yaml").write_text(profiles_yaml(tiny_models, {"small": "small", "frontier": "frontier"}))
    proc = start_up(tmp_path, policy, gw_port, redis_port)
    assert proc.stdout is not None
    try:
        found = read_endpoint(proc)
        assert found.get("GATEWAY_URL") == f"http://127.0.0.1:{gw_port}", (tmp_path / "up.log").read_text()[-3000:]
        auth = {"authorization": f"Bearer {found['GATEWAY_API_KEY']}"}
        for task, tier, model in (("classification", "small", "tiny-small"), (None, "frontier", "tiny-frontier")):
            r = httpx.post(
                f"{found['GATEWAY_URL']}/v1/chat/completions",
                headers=auth,
                json={"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                | ({"metadata": {"task": task}} if task else {}),
                timeout=60,
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-gateway-tier"] == tier and r.json()["model"] == model
            assert r.json()["system_fingerprint"].startswith("vllm-0.32")  # the real engine
        progress = (tmp_path / "up.log").read_text()
        assert "waiting for workers…" in progress and "small" in progress  # progress, not silence
        assert all(listening(p) for p in (small_port, frontier_port, gw_port, redis_port))
    finally:
        interrupt(proc, timeout=120)
    assert proc.returncode == 0
    assert not any(listening(p) for p in (small_port, frontier_port, gw_port, redis_port))
    leftovers = subprocess.run(["pgrep", "-f", f"--port {small_port}|--port {frontier_port}"], capture_output=True)
    assert leftovers.stdout == b""  # no launcher, vLLM server or engine process left behind


def test_up_refuses_missing_worker_profiles_and_ports_in_use(tmp_path: Path) -> None:
    small_port, frontier_port = free_port(), free_port()
    policy = tmp_path / "stack.yaml"
    policy.write_text(two_tier_policy([f"http://127.0.0.1:{small_port}"], [f"http://127.0.0.1:{frontier_port}"]))

    def up(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "up", "--policy", str(policy), *flags],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
        )

    r = up()
    assert r.returncode == 1 and f"{tmp_path / 'stack.workers.yaml'}:1: cannot read worker profiles" in r.stderr
    (tmp_path / "stack.workers.yaml").write_text("version: 1\ntiers:\n  small: {model: m}\n")
    r = up()
    assert r.returncode == 1 and "stack.workers.yaml: no worker profile for tier(s) frontier" in r.stderr
    other = tmp_path / "other.yaml"
    other.write_text("version: 1\ntiers:\n  small: {model: m}\n  frontier: {model: n}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", small_port))
        busy.listen()
        r = up("--workers", str(other))
    assert r.returncode == 1 and f"port(s) {small_port} already in use" in r.stderr
    assert not (tmp_path / ".run" / "redis").exists()  # refused before anything was started
