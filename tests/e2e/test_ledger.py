"""The ledger end to end: every request that reached a worker billed exactly once, under load,
with clients leaving mid-stream, a worker killed in the middle, and Redis going away."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import RedisMode
from tests.ledger_traffic import POLICY, ledger_by_id, make_keys, one, traffic
from tests.procs import ClusterServer, Gateway, RedisServer, Sim, gateway_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def mode(env: dict[str, str]) -> RedisMode:
    return "cluster" if env.get("GATEWAY_REDIS_MODE") == "cluster" else "single"


@pytest.mark.parametrize("backend", ["redis", "cluster"])
def test_every_request_that_reached_a_worker_is_billed_exactly_once(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    # on the session's Redis Cluster, the ledger's keys live on one of its primaries
    redis_server: RedisServer | ClusterServer = (
        request.getfixturevalue("redis_cluster") if backend == "cluster" else RedisServer(tmp_path)
    )
    redis_mode = mode(redis_server.env)
    small = Sim("tiny-small", tmp_path, "--tpot-ms", "5")
    f1 = Sim("tiny-frontier", tmp_path, "--tpot-ms", "5")
    f2 = Sim("tiny-frontier", tmp_path, "--tpot-ms", "5")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(small=small.url, f1=f1.url, f2=f2.url))
    gw = Gateway(policy, tmp_path, redis_server.env)
    try:
        keys = asyncio.run(make_keys(redis_server.url, redis_mode))
        assert f2.proc is not None

        def kill_f2() -> None:
            # mid-stream: wait (briefly) until f2 is generating, so that some streams are cut
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                page = httpx.get(f"{f2.url}/metrics", timeout=2).text
                running = next(x for x in page.splitlines() if x.startswith("vllm:num_requests_running"))
                if float(running.rsplit(" ", 1)[1]) > 0:
                    break
                time.sleep(0.005)
            os.kill(f2.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]

        seen = asyncio.run(traffic(gw.url, keys, 2000, kill_f2))
        time.sleep(1.0)  # records are written in batches after the responses
        ledger = asyncio.run(ledger_by_id(redis_server.url, redis_mode))
    finally:
        gw.stop()
        for s in (small, f1, f2):
            s.stop()
        if isinstance(redis_server, RedisServer):
            redis_server.stop()

    answered = [s for s in seen if s.get("status") == 200]
    assert len(answered) >= 1900, Counter(s.get("status") for s in seen)
    totals_client: Counter[tuple[str, str]] = Counter()
    totals_ledger: Counter[tuple[str, str]] = Counter()
    outcomes = Counter()
    for s in answered:
        rec = ledger[s["id"]]  # every answered request has its record
        outcomes[rec.outcome] += 1
        assert rec.tier == s["tier"]
        if rec.outcome == "ok" and s["left"]:
            # the stream had finished (worker usage in hand) before the hang-up was noticed: the
            # worker generated every token, and that is what is billed
            assert rec.completion_tokens == s["max_tokens"] >= s["text_tokens"], (s, rec)
            client_tokens = rec.completion_tokens
        elif rec.outcome == "ok":
            client_tokens = s["usage"]["completion_tokens"] if s.get("usage") else s["text_tokens"]
            assert rec.completion_tokens == client_tokens == s["max_tokens"], (s, rec)
            if s.get("usage"):
                assert rec.prompt_tokens == s["usage"]["prompt_tokens"]
        else:
            # cut short: billed what was relayed — at least what this client read, at most what was asked
            assert rec.outcome in ("client_disconnect", "partial"), rec
            assert s["text_tokens"] <= rec.completion_tokens <= s["max_tokens"], (s, rec)
            client_tokens = rec.completion_tokens
        totals_client[(rec.tenant, rec.tier)] += client_tokens
        totals_ledger[(rec.tenant, rec.tier)] += rec.completion_tokens
    assert totals_client == totals_ledger
    assert outcomes["client_disconnect"] >= 50, outcomes  # most clients that left early cut their stream
    assert outcomes["partial"] >= 1, outcomes  # streams cut by the killed worker
    assert set(ledger) >= {s["id"] for s in answered}
    assert all(r.tenant in ("media", "ads") for r in ledger.values())


def test_records_survive_a_redis_outage_exactly_once(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path, persist=True)
    sim = Sim("tiny-frontier", tmp_path)
    small = Sim("tiny-small", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        POLICY.format(small=small.url, f1=sim.url, f2=sim.url.replace("127.0.0.1", "localhost")).replace(
            "routes:", "on_redis_error: fail_open\nroutes:"
        )
    )
    gw = Gateway(policy, tmp_path, {"GATEWAY_REDIS_URL": redis_server.url})
    try:
        keys = asyncio.run(make_keys(redis_server.url))

        async def run() -> list[dict[str, Any]]:
            async with httpx.AsyncClient(timeout=30) as client:
                first = [await one(client, gw.url, i, keys["media"]) for i in range(0, 30, 3)]
                await asyncio.to_thread(redis_server.stop)
                during = [await one(client, gw.url, i, keys["media"]) for i in range(30, 90, 3)]
                await asyncio.sleep(0.5)
                await asyncio.to_thread(redis_server.start)
                after = [await one(client, gw.url, i, keys["media"]) for i in range(90, 120, 3)]
                return first + during + after

        seen = asyncio.run(run())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list((tmp_path / f"spool-{gw.port}").glob("*")):
            time.sleep(0.2)  # the spool is replayed once Redis is back
        assert not list((tmp_path / f"spool-{gw.port}").glob("*"))
        time.sleep(0.5)
        ledger = asyncio.run(ledger_by_id(redis_server.url))
    finally:
        gw.stop()
        sim.stop()
        small.stop()
        redis_server.stop()
    assert [s["status"] for s in seen] == [200] * len(seen)  # fail_open: served throughout
    assert {s["id"] for s in seen} == set(ledger)  # every record present, exactly once
    logs = gw.log.read_text()
    assert '"ledger_spooled"' in logs and '"ledger_spool_replayed"' in logs


def test_ledger_commands(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    sim, sim2, small = Sim("tiny-frontier", tmp_path), Sim("tiny-frontier", tmp_path), Sim("tiny-small", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(small=small.url, f1=sim.url, f2=sim2.url))
    env = {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_ADMIN_TOKEN": "adm"}
    gw = Gateway(policy, tmp_path, env)
    try:
        keys = asyncio.run(make_keys(redis_server.url))

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return gateway_cli(env, "ledger", *args)

        marked = cli("reconcile", "--mark", "--worker", sim.url, "--worker", sim2.url, "--worker", small.url)
        assert marked.returncode == 0 and "marked 3 workers" in marked.stdout

        async def run() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                for i in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12):  # no client leaving early here
                    await one(client, gw.url, i, keys["media" if i % 2 else "ads"])

        asyncio.run(run())
        time.sleep(0.5)
        reconciled = cli("reconcile")
        assert reconciled.returncode == 0, reconciled.stdout
        assert reconciled.stdout.count(" ok") == 3
        # a request straight to a worker, past the gateway: the ledger cannot know it
        httpx.post(
            f"{sim.url}/v1/chat/completions",
            json={"model": "tiny-frontier", "messages": [{"role": "user", "content": "x"}]},
        )
        reconciled = cli("reconcile")
        assert reconciled.returncode == 1 and "DIFFERENT" in reconciled.stdout

        report = json.loads(cli("report", "--group-by", "tenant,tier", "--format", "json").stdout)
        assert sum(r["requests"] for r in report) == 12
        assert {(r["tenant"], r["tier"]) for r in report} == {
            ("ads", "small"),
            ("ads", "frontier"),
            ("media", "frontier"),
        }
        exported = cli("export", "--format", "jsonl").stdout.splitlines()
        assert len(exported) == 12 and {json.loads(x)["tenant"] for x in exported} == {"media", "ads"}
        csv_lines = cli("export", "--format", "csv").stdout.splitlines()
        assert csv_lines[0].startswith("request_id,time,tenant,key_id,route,tier") and len(csv_lines) == 13
        assert cli("verify").stdout.startswith("ok")
        assert "total: 12 requests" in cli("report").stdout
        admin = {"authorization": "Bearer adm"}
        data = httpx.get(f"{gw.url}/admin/ledger", params={"group_by": "tier"}, headers=admin).json()["data"]
        assert sum(r["requests"] for r in data) == 12 and all(isinstance(r["cost_usd"], str) for r in data)
        csv_resp = httpx.get(f"{gw.url}/admin/ledger.csv", headers=admin)
        assert csv_resp.headers["content-type"].startswith("text/csv")
        assert csv_resp.text.splitlines()[0] == "day,tenant,tier,requests,input_tokens,output_tokens,cost_usd"
        assert httpx.get(f"{gw.url}/admin/ledger").status_code == 401
    finally:
        gw.stop()
        for s in (sim, sim2, small):
            s.stop()
        redis_server.stop()


def test_sigterm_finishes_streams_in_flight_and_writes_their_records(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    small, f1, f2 = (
        Sim("tiny-small", tmp_path),
        Sim("tiny-frontier", tmp_path, "--tpot-ms", "100"),
        Sim("tiny-frontier", tmp_path, "--tpot-ms", "100"),
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(small=small.url, f1=f1.url, f2=f2.url))
    gw = Gateway(policy, tmp_path, {"GATEWAY_REDIS_URL": redis_server.url})
    try:
        keys = asyncio.run(make_keys(redis_server.url))

        async def stream_while_stopping() -> dict[str, Any]:
            async with httpx.AsyncClient(timeout=30) as client:
                task = asyncio.create_task(one(client, gw.url, 1, keys["media"]))  # 11 tokens, ~1.1 s
                await asyncio.sleep(0.4)
                gw.proc.send_signal(signal.SIGTERM)
                return await task

        seen = asyncio.run(stream_while_stopping())
        assert gw.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert seen["status"] == 200 and seen["text_tokens"] == seen["max_tokens"] == 11  # not cut short
        ledger = asyncio.run(ledger_by_id(redis_server.url))
        assert ledger[seen["id"]].outcome == "ok" and ledger[seen["id"]].completion_tokens == 11
    finally:
        gw.stop()
        for s in (small, f1, f2):
            s.stop()
        redis_server.stop()
