"""Metrics that don't leak: tenant-labelled series only on the metrics listener (and there only
with its token), never on the serving port; the model list only for key holders under API keys."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway import store
from gateway.keys import KeyStore
from tests.procs import ROOT, Gateway, RedisServer, Sim, free_port, two_tier_policy

pytestmark = pytest.mark.e2e

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def test_tenant_metrics_are_only_on_the_metrics_port(tmp_path: Path, redis_server: RedisServer) -> None:
    small, frontier = Sim("tiny-small", tmp_path), Sim("tiny-frontier", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [frontier.url]).replace("auth: none\n", ""))  # API keys on
    env = {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_METRICS_TOKEN": "scrape-me"}
    gw = Gateway(policy, tmp_path, env)

    async def create_key() -> str:
        client = store.connect(redis_server.url)
        try:
            return (await KeyStore(client).create("acme-secret-tenant"))[1]
        finally:
            await client.aclose()

    try:
        key = asyncio.run(create_key())
        holder = {"authorization": f"Bearer {key}"}
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=holder).status_code == 200

        for headers in (holder, {}, {"authorization": "Bearer scrape-me"}):  # a key holder, anyone, even the token
            r = httpx.get(f"{gw.url}/metrics", headers=headers)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            assert "acme" not in r.text and "gateway_" not in r.text

        for headers in ({}, holder, {"authorization": "Bearer wrong"}):
            r = httpx.get(gw.metrics_url, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert "acme" not in r.text
        r = httpx.get(gw.metrics_url, headers={"authorization": "Bearer scrape-me"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert 'gateway_input_tokens_total{tenant="acme-secret-tenant",tier="frontier"}' in r.text

        # the model list, as OpenAI's: a key is needed
        for headers in ({}, {"authorization": "Bearer gk_not-a-key"}):
            r = httpx.get(f"{gw.url}/v1/models", headers=headers)
            assert r.status_code == 401
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        r = httpx.get(f"{gw.url}/v1/models", headers=holder)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["auto", "small"]
    finally:
        gw.stop()
        small.stop()
        frontier.stop()


def test_models_need_no_key_under_auth_none(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy(["http://127.0.0.1:9"], ["http://127.0.0.1:9"]))  # auth: none
    gw = Gateway(policy, tmp_path)
    try:
        assert httpx.get(f"{gw.url}/v1/models").status_code == 200
        assert httpx.get(f"{gw.url}/metrics").status_code == 404
        metrics = httpx.get(gw.metrics_url)  # no token set: the loopback listener answers anyone on the host
        assert metrics.status_code == 200 and "gateway_policy_info{" in metrics.text
        assert httpx.get(gw.metrics_url.replace("/metrics", "/other")).status_code == 404
        assert httpx.post(gw.metrics_url).status_code == 405
        with socket.create_connection(("127.0.0.1", gw.metrics_port), timeout=10) as s:  # a head too big: dropped
            s.sendall(b"GET /metrics HTTP/1.1\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n")
            try:
                answer = s.recv(65536)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
    finally:
        gw.stop()


def test_a_metrics_port_in_use_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy(["http://127.0.0.1:9"], ["http://127.0.0.1:9"]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            done = subprocess.run(
                [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(free_port())],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                env={"PATH": "/usr/bin:/bin", "GATEWAY_METRICS_PORT": str(port), "GATEWAY_WORKERS": workers},
            )
            assert done.returncode == 2
            assert f"cannot listen for metrics on 127.0.0.1:{port}" in done.stderr
            assert "GATEWAY_METRICS_PORT" in done.stderr
