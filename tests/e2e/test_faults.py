"""Failures between the gateway and its workers, injected into real simulator processes."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, Sim, free_port, two_tier_policy

pytestmark = pytest.mark.e2e
MSG = [{"role": "user", "content": "hello"}]


def gateway(tmp_path: Path, small: list[str], frontier: list[str]) -> Gateway:
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy(small, frontier))
    return Gateway(policy, tmp_path)


def test_worker_errors_are_retried_on_another_worker(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    small, f1, f2 = sims
    gw = gateway(tmp_path, [small.url], [f1.url, f2.url])
    try:
        f1.faults(error_rate=1.0)
        for _ in range(6):
            r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG})
            assert r.status_code == 200
            assert r.json()["model"] == "tiny-frontier"
        assert f2.stats()["completed"] == 6
        entries = [json.loads(x) for x in gw.log_lines() if '"event":"request"' in x]
        assert {e["attempts"] for e in entries} <= {1, 2}
        assert any(e["attempts"] == 2 for e in entries)
    finally:
        gw.stop()


def test_dead_tier_falls_back(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    _small, f1, _ = sims
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway(tmp_path, [dead], [f1.url])
    try:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "small", "messages": MSG})
        assert r.status_code == 200
        assert (r.headers["x-gateway-route"], r.headers["x-gateway-tier"]) == ("small-alias", "frontier")
        assert httpx.get(f"{gw.url}/readyz").status_code == 503  # small has no reachable worker
    finally:
        gw.stop()


def test_all_workers_down_is_an_openai_shaped_5xx(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    small, f1, _ = sims
    gw = gateway(tmp_path, [small.url], [f1.url])
    try:
        small.faults(error_rate=1.0)
        f1.faults(error_rate=1.0)
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "small", "messages": MSG})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "worker_unavailable"
        assert r.headers["x-gateway-route"] == "small-alias"
        small.stop()
        f1.stop()
        time.sleep(1.2)  # the active health checks notice (interval 0.5 s in tests)
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "small", "messages": MSG})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "no_healthy_worker"
    finally:
        gw.stop()


def test_hanging_worker_is_a_504_within_the_first_byte_timeout(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    small, f1, _ = sims
    gw = gateway(tmp_path, [small.url], [f1.url])
    try:
        f1.faults(hang=True)
        start = time.monotonic()
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG}, timeout=30)
        elapsed = time.monotonic() - start
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "worker_timeout"
        assert elapsed < 10  # first_byte is 2 s in the test policy; the bound only guards against hanging forever
    finally:
        gw.stop()


def test_worker_dropping_mid_stream_ends_the_stream_with_an_error_event(
    tmp_path: Path, sims: tuple[Sim, Sim, Sim]
) -> None:
    small, f1, _ = sims
    gw = gateway(tmp_path, [small.url], [f1.url])
    try:
        f1.faults(drop_after=2)
        with httpx.stream(
            "POST",
            f"{gw.url}/v1/chat/completions",
            json={"model": "auto", "messages": MSG, "stream": True, "max_tokens": 10},
        ) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line]
        assert json.loads(events[-1][6:])["error"]["code"] == "worker_stream_error"
        assert sum(1 for e in events if '"content"' in e) == 3  # role chunk + 2 words
        time.sleep(0.2)
        entry = next(json.loads(x) for x in reversed(gw.log_lines()) if '"event":"request"' in x)
        assert entry["outcome"] == "partial"
    finally:
        gw.stop()


def test_client_disconnect_closes_the_upstream_request(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    small, f1, _ = sims
    gw = gateway(tmp_path, [small.url], [f1.url])
    try:
        f1.faults(tpot_ms=50)
        body = json.dumps({"model": "auto", "messages": MSG, "stream": True, "max_tokens": 200}).encode()
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert b"200 OK" in sock.recv(4096)
        deadline = time.monotonic() + 5
        while f1.stats()["aborted"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = f1.stats()
        assert stats["aborted"] == 1
        assert stats["completed"] == 0
        assert stats["generation_tokens"] < 200  # the worker stopped generating
        time.sleep(0.2)
        entry = next(json.loads(x) for x in reversed(gw.log_lines()) if '"event":"request"' in x)
        assert entry["outcome"] == "client_disconnect"
        # the worker slot was released: readiness and further traffic are unaffected
        f1.faults(tpot_ms=0)
        assert httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG}).status_code == 200
    finally:
        gw.stop()


def test_dns_discovered_workers_serve(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    small, f1, _ = sims
    policy = tmp_path / "policy.yaml"
    text = two_tier_policy([small.url], [f"http://localhost:{f1.port}"])
    policy.write_text(text.replace("    model: tiny-frontier\n", "    model: tiny-frontier\n    discover: dns\n"))
    gw = Gateway(policy, tmp_path)
    try:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG})
        assert r.status_code == 200 and r.headers["x-gateway-tier"] == "frontier"
        discovered = next(json.loads(x) for x in gw.log_lines() if '"workers_discovered"' in x)
        assert f"http://127.0.0.1:{f1.port}" in discovered["workers"]
    finally:
        gw.stop()


def test_session_affinity_sticks_to_one_worker(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    small, f1, f2 = sims
    policy = tmp_path / "policy.yaml"
    text = two_tier_policy([small.url], [f1.url, f2.url])
    policy.write_text(
        text.replace("    model: tiny-frontier\n", "    model: tiny-frontier\n    affinity: {header: x-session-id}\n")
    )
    gw = Gateway(policy, tmp_path)
    try:
        served: dict[str, set[int]] = {}
        for session in ("alice", "bob", "carol", "dave"):
            for _ in range(5):
                before = (f1.stats()["completed"], f2.stats()["completed"])
                r = httpx.post(
                    f"{gw.url}/v1/chat/completions",
                    json={"model": "auto", "messages": MSG},
                    headers={"x-session-id": session},
                )
                assert r.status_code == 200
                after = (f1.stats()["completed"], f2.stats()["completed"])
                served.setdefault(session, set()).add(0 if after[0] > before[0] else 1)
        assert all(len(workers) == 1 for workers in served.values()), served  # each session on one worker
    finally:
        gw.stop()


def test_a_worker_dripping_blank_lines_times_out_at_idle(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    """Bytes that make no event do not keep a stream (and its client) hanging: idle counts from the
    last event relayed."""
    small, f1, _ = sims
    gw = gateway(tmp_path, [small.url], [f1.url])  # idle: 1 s
    try:
        f1.faults(drip=True)
        started = time.monotonic()
        body = {"model": "auto", "messages": MSG, "stream": True, "max_tokens": 5}
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=10) as r:
            data = r.read()
        assert r.status_code == 200
        assert time.monotonic() - started < 5
        assert data.rstrip().endswith(b'"code":"worker_stream_error"}}')
        deadline = time.monotonic() + 5
        while f1.stats()["aborted"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f1.stats()["aborted"] == 1  # the worker's connection was closed: it stopped
    finally:
        gw.stop()
