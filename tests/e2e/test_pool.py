"""The worker pool against real simulator processes: load-aware picks, dead workers, reported load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, Sim, two_tier_policy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MSG = [{"role": "user", "content": "hello"}]


def start_gateway(tmp_path: Path, sims: tuple[Sim, Sim, Sim], **env: str) -> Gateway:
    small, f1, f2 = sims
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [f1.url, f2.url]))
    return Gateway(policy, tmp_path, env)


async def hammer(url: str, clients: int, seconds: float, max_tokens: int = 4) -> tuple[int, list[int]]:
    """``clients`` concurrent loops of requests for ``seconds``: (successes, failed statuses)."""
    ok, failed = 0, []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=10) as client:

        async def loop() -> None:
            nonlocal ok
            while time.monotonic() < deadline:
                try:
                    r = await client.post(
                        f"{url}/v1/chat/completions", json={"model": "auto", "messages": MSG, "max_tokens": max_tokens}
                    )
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                if status == 200:
                    ok += 1
                else:
                    failed.append(status)

        await asyncio.gather(*(loop() for _ in range(clients)))
    return ok, failed


def test_a_slow_worker_gets_fewer_requests(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    _, slow, fast = sims
    slow.faults(ttft_ms=150)
    gw = start_gateway(tmp_path, sims)
    try:
        ok, failed = asyncio.run(hammer(gw.url, clients=6, seconds=3))
        assert failed == []
        n_slow, n_fast = slow.stats()["completed"], fast.stats()["completed"]
        assert n_slow + n_fast == ok
        # least in-flight: requests pile up on the slow worker, so new ones go to the fast one
        assert n_fast > 4 * n_slow, (n_slow, n_fast)
        assert n_slow > 0  # it still gets its share
    finally:
        gw.stop()


def test_a_worker_busy_with_other_clients_gets_fewer_requests(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    """The gateway's own in-flight count cannot see another replica's traffic; the worker's /metrics
    (vllm:num_requests_running/waiting) can."""
    _, busy, idle = sims
    busy.faults(tpot_ms=20)
    idle.faults(tpot_ms=20)
    gw = start_gateway(tmp_path, sims, GATEWAY_LOAD_SCRAPE_INTERVAL_S="0.2")

    async def scenario() -> tuple[int, int]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "tiny-frontier", "messages": MSG, "max_tokens": 400}  # ~8 s each
            others = [asyncio.create_task(client.post(f"{busy.url}/v1/chat/completions", json=body)) for _ in range(8)]
            await asyncio.sleep(1.0)  # a few scrapes
            before = busy.stats()["requests"]
            for _ in range(20):  # one at a time: our own in-flight count is 0 on both at every pick
                r = await client.post(
                    f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG, "max_tokens": 2}
                )
                assert r.status_code == 200
            to_busy = busy.stats()["requests"] - before
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            return to_busy, 20 - to_busy

    try:
        to_busy, to_idle = asyncio.run(scenario())
        assert to_busy <= 2 and to_idle >= 18, (to_busy, to_idle)
    finally:
        gw.stop()


def test_without_load_reports_sequential_requests_alternate(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    """The control for the test above: with scraping off, the same workers share evenly."""
    _, f1, f2 = sims
    gw = start_gateway(tmp_path, sims, GATEWAY_LOAD_SCRAPE_INTERVAL_S="0")
    try:
        for _ in range(20):
            r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG, "max_tokens": 2})
            assert r.status_code == 200
        assert f1.stats()["completed"] == f2.stats()["completed"] == 10
    finally:
        gw.stop()


def test_a_killed_worker_is_ejected_and_traffic_continues(tmp_path: Path, sims: tuple[Sim, Sim, Sim]) -> None:
    _, victim, survivor = sims
    victim.faults(ttft_ms=20)
    survivor.faults(ttft_ms=20)
    gw = start_gateway(tmp_path, sims)
    clients = 4

    async def scenario() -> tuple[int, list[int], int, list[int]]:
        load = asyncio.create_task(hammer(gw.url, clients=clients, seconds=4))
        await asyncio.sleep(1.5)
        os.kill(victim.proc.pid, signal.SIGKILL)
        ok, failed = await load
        after_ok, after_failed = await hammer(gw.url, clients=clients, seconds=1)
        return ok, failed, after_ok, after_failed

    try:
        served_before = victim.stats()["completed"]
        assert served_before == 0
        ok, failed, after_ok, after_failed = asyncio.run(scenario())
        # at most the requests in flight on the victim when it died fail (most are retried elsewhere)
        assert len(failed) <= clients, failed
        assert ok > 50
        assert after_failed == [] and after_ok > 10
        assert any('"worker_ejected"' in line or '"worker_unhealthy"' in line for line in gw.log_lines())
    finally:
        gw.stop()
