"""``python -m workers launch``'s life cycle, fast: a stand-in for vLLM (``tests/fake_vllm.py``,
the simulator behind vLLM's command line) through ``--python``. The real engine is exercised by
``test_vllm.py``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import registry, store
from tests.procs import ROOT, RedisServer, stop
from tests.vllm_stack import LaunchedWorker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def registered(redis_url: str, tier: str) -> tuple[list[str], dict[str, str]]:
    async def look() -> tuple[list[str], dict[str, str]]:
        client = store.connect(redis_url, timeout_s=5)
        try:
            info = await client.hgetall(registry.info_key(tier))
            return await registry.live_workers(client, tier), {k.decode(): v.decode() for k, v in info.items()}
        finally:
            await client.aclose()

    return asyncio.run(look())


def launch(tmp_path: Path, redis_url: str, *, fail: bool = False, ttl: float = 2.0) -> LaunchedWorker:
    """The launcher with a stand-in for vLLM, serving tier small from a profile written here."""
    fake = tmp_path / "python-with-fake-vllm"
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_vllm.py"}" "$@"\n')
    fake.chmod(0o755)
    profile = tmp_path / "workers.yaml"
    profile.write_text(
        "version: 1\ntiers:\n  small:\n    model: /models/m\n    served_model_name: tiny-small\n"
        "    max_model_len: 2048\n    env: {VLLM_CPU_KVCACHE_SPACE: '1'}\n"
    )
    env = {"FAKE_VLLM_FAIL": "1"} if fail else {}
    return LaunchedWorker(profile, "small", redis_url, tmp_path, ttl=ttl, python=fake, env=env)


@pytest.fixture
def redis_url(tmp_path: Path) -> str:
    server = RedisServer(tmp_path)
    yield server.url  # type: ignore[misc]
    server.stop()


def test_launch_registers_then_deregisters_and_stops_vllm_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    w = launch(tmp_path, redis_url)
    try:
        w.wait(timeout=30)
        live, info = registered(redis_url, "small")
        assert live == [w.url], (live, info)
        assert set(info) == {w.url}, (live, info)
        entry = json.loads(info[w.url])
        assert entry["model"] == "tiny-small" and entry["tier"] == "small" and entry["url"] == w.url
        assert "starting vLLM (tiny-small)" in w.output() and "ready in" in w.output()
        # the profile's arguments reached vLLM's command line
        assert "model=/models/m" in w.vllm_log.read_text()
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(timeout=30) == 0
        assert registered(redis_url, "small") == ([], {})  # gone at once, not after the TTL
        assert not listening(w.port)  # vLLM stopped with it
    finally:
        stop(w.proc)


def test_a_killed_launcher_takes_vllm_with_it_and_its_registration_lapses(tmp_path: Path, redis_url: str) -> None:
    w = launch(tmp_path, redis_url, ttl=2.0)
    try:
        w.wait(timeout=30)
        w.proc.kill()  # no chance to deregister or stop vLLM itself
        w.proc.wait()
        killed = time.monotonic()
        while (listening(w.port) or registered(redis_url, "small")[0]) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        assert not listening(w.port)  # vLLM got SIGTERM when its parent died
        assert registered(redis_url, "small")[0] == []
        assert time.monotonic() - killed < 2 + 1  # within the heartbeat TTL
    finally:
        stop(w.proc)


def test_vllm_dying_later_makes_the_launcher_exit_non_zero_and_deregister(tmp_path: Path, redis_url: str) -> None:
    w = launch(tmp_path, redis_url)
    try:
        w.wait(timeout=30)
        out = subprocess.run(["pgrep", "-f", f"fake_vllm.py -m vllm.entrypoints.openai.api_server .*--port {w.port}"],
                             capture_output=True, text=True)  # fmt: skip
        pids = [int(p) for p in out.stdout.split()]
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        assert w.proc.wait(timeout=15) == 1
        assert "vLLM exited with code -9; vLLM's last log lines" in w.output()
        assert "| INFO fake vLLM: model=/models/m" in w.output()
        assert registered(redis_url, "small") == ([], {})
    finally:
        stop(w.proc)


def test_vllm_failing_to_start_is_reported_with_its_last_lines(tmp_path: Path, redis_url: str) -> None:
    w = launch(tmp_path, redis_url, fail=True)
    try:
        assert w.proc.wait(timeout=30) == 1
        out = w.output()
        assert "vLLM exited with code 1 while starting; vLLM's last log lines" in out
        assert "  | OSError: cannot load model '/models/m'" in out
        assert registered(redis_url, "small") == ([], {})  # never registered
    finally:
        stop(w.proc)


def test_unknown_tier_and_bad_profile_are_refused(tmp_path: Path) -> None:
    profile = tmp_path / "workers.yaml"
    profile.write_text("version: 1\ntiers:\n  small: {model: m}\n")
    base = [sys.executable, "-m", "workers", "launch", "--profile", str(profile), "--port", "1", "--redis", ""]
    r = subprocess.run([*base, "--tier", "frontier"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2 and f"{profile}: no profile for tier 'frontier' (has: small)" in r.stderr
    profile.write_text("version: 1\ntiers:\n  small: {model: m, dtype: int4}\n")
    r = subprocess.run([*base, "--tier", "small"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2
    assert f"{profile}:3: tiers.small.dtype: expected one of auto" in r.stderr
