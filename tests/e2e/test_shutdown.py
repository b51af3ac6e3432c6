"""SIGTERM with requests that outlive the grace period: each ends in its client's dialect (a plain
request with a 503 ``shutting_down``, a stream with an error event), no traceback in the log, one
ledger record with outcome ``shutdown`` each, and the process gone within grace + 5 s."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import ledger_report, store
from tests.procs import Gateway, RedisServer, Sim, two_tier_policy

pytestmark = pytest.mark.e2e

GRACE_S = 1.0


async def _ledger(url: str) -> list[Any]:
    client = store.connect(url, timeout_s=5)
    try:
        return [r async for r in ledger_report.records(client)]
    finally:
        await client.aclose()


def _body(stream: bool) -> dict[str, Any]:
    # 400 tokens at 20 ms each: 8 s of generation, far beyond the grace period
    return {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": stream}


async def _plain(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as client:
        return await client.post(f"{url}/v1/chat/completions", json=_body(False))


async def _stream(url: str) -> list[str]:
    async with (
        httpx.AsyncClient(timeout=20) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=_body(True)) as r,
    ):
        assert r.status_code == 200
        return [line async for line in r.aiter_lines() if line]


def test_requests_cut_by_shutdown_end_cleanly_and_are_billed_as_shutdown(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    sim = Sim("tiny-frontier", tmp_path, "--tpot-ms", "20")
    small = Sim("tiny-small", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [sim.url]).replace("idle: 1}", "idle: 5}"))
    env = {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_SHUTDOWN_GRACE_S": str(GRACE_S)}
    gw = Gateway(policy, tmp_path, env)
    try:

        async def run() -> tuple[httpx.Response, list[str], float]:
            plain = asyncio.create_task(_plain(gw.url))
            stream = asyncio.create_task(_stream(gw.url))
            deadline = time.monotonic() + 10
            while sim.stats()["requests"] < 2:  # both reached the worker
                assert time.monotonic() < deadline, "the requests never reached the worker"
                await asyncio.sleep(0.05)
            signalled = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            return await plain, await stream, signalled

        response, lines, signalled = asyncio.run(run())
        gw.proc.wait(timeout=max(0.0, signalled + GRACE_S + 5 - time.monotonic()))  # exits within grace + 5 s

        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["type"] == "api_error" and error["code"] == "shutting_down"

        last = json.loads(lines[-1].removeprefix("data: "))
        assert last["error"]["code"] == "shutting_down", lines[-3:]
        assert not any(line == "data: [DONE]" for line in lines)

        log = gw.log.read_text()
        assert "Traceback" not in log and "CancelledError" not in log

        records = asyncio.run(_ledger(redis_server.url))
        assert sorted(r.stream for r in records) == [False, True]
        assert {r.outcome for r in records} == {"shutdown"}
    finally:
        gw.stop()
        sim.stop()
        small.stop()
        redis_server.stop()
