"""Placement and flow control against real simulator workers and gateway processes: prefixes stick
to one worker across replicas, a leaving worker moves only its own prefixes, a flooding tenant
leaves a trickle its turns, a queue deadline is a 503 with Retry-After, and spill only past its bound."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.procs import Gateway, RedisServer, Sim

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UNUSED = "http://127.0.0.1:9"  # the frontier tier of tests that never reach it: no process to start
START_S = 90.0  # a gateway starts in ~2 s; on a machine shared by many jobs it has taken over 30
Proc = TypeVar("Proc", Sim, Gateway, RedisServer)


@pytest.fixture
def keep() -> Iterator[Callable[[Proc], Proc]]:
    """Register a started process; every one is stopped after the test, however it ended
    (a gateway that fails to start leaves no simulator behind). Gateways stop first."""
    started: list[Sim | Gateway | RedisServer] = []

    def add(proc: Proc) -> Proc:
        started.append(proc)
        return proc

    yield add
    for proc in sorted(started, key=lambda p: not isinstance(p, Gateway)):
        proc.stop()


def policy(small: list[str], frontier: list[str], tier_extra: str = "", route_extra: str = "") -> str:
    def workers(urls: list[str]) -> str:
        return "".join(f"      - url: {u}\n" for u in urls)

    return f"""version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers:
{workers(small)}    price: {{input: 0.10, output: 0.40}}
    timeouts: {{connect: 1, first_byte: 10, idle: 5}}
{tier_extra}  frontier:
    model: tiny-frontier
    workers:
{workers(frontier)}    price: {{input: 3.00, output: 15.00}}
routes:
  - name: small
    match: {{model: [small]}}
    tier: small
    fallback: [frontier]
{route_extra}  - name: default
    tier: frontier
"""


def entries(gw: Gateway) -> dict[str, dict[str, Any]]:
    """The gateway's request log lines by request id."""
    out = {}
    for line in gw.log_lines():
        if '"event":"request"' in line:
            e = json.loads(line)
            out[e["request_id"]] = e
    return out


def chat(system: str, question: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": "small", "messages": messages, "max_tokens": 2, **extra}


SYSTEMS = [f"You are assistant number {i}. Follow the house style guide closely. " * 12 for i in range(8)]


def workers_of(gateways: list[Gateway], rids: dict[str, tuple[int, int]]) -> dict[int, set[str]]:
    """prefix -> the workers its requests went to, read from every replica's log."""
    logged: dict[str, dict[str, Any]] = {}
    for gw in gateways:
        logged.update(entries(gw))
    out: dict[int, set[str]] = {}
    for rid, (prefix, _) in rids.items():
        out.setdefault(prefix, set()).add(logged[rid]["worker"])
    return out


def send_all(gateways: list[Gateway], rounds: int) -> dict[str, tuple[int, int]]:
    rids = {}
    with httpx.Client(timeout=10) as client:
        for i, system in enumerate(SYSTEMS):
            for r in range(rounds):
                gw = gateways[r % len(gateways)]
                resp = client.post(f"{gw.url}/v1/chat/completions", json=chat(system, f"question {r}"))
                assert resp.status_code == 200, resp.text
                rids[resp.headers["x-gateway-request-id"]] = (i, r)
    return rids


def wait_for_log(gateways: list[Gateway], rids: dict[str, tuple[int, int]]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen: set[str] = set()
        for gw in gateways:
            seen |= set(entries(gw))
        if set(rids) <= seen:
            return
        time.sleep(0.05)
    raise AssertionError("request log lines missing")


@pytest.mark.timeout(300)  # seven processes; on a busy shared machine a gateway has taken 30 s to start
def test_prefix_sticks_to_one_worker_across_replicas_and_a_leaving_worker_moves_only_its_own(
    tmp_path: Path, keep: Callable[[Any], Any]
) -> None:
    sims = [keep(Sim("tiny-small", tmp_path)) for _ in range(3)]
    path = tmp_path / "policy.yaml"
    path.write_text(policy([s.url for s in sims], [UNUSED], "    placement: prefix\n"))
    gateways = [keep(Gateway(path, tmp_path, start_timeout=START_S)) for _ in range(3)]
    rids = send_all(gateways, rounds=3)
    wait_for_log(gateways, rids)
    before = workers_of(gateways, rids)
    assert all(len(ws) == 1 for ws in before.values()), before  # one worker per prefix, every replica
    owner = {p: next(iter(ws)) for p, ws in before.items()}
    assert len(set(owner.values())) >= 2  # prefixes spread over the workers
    leaving = max(set(owner.values()), key=lambda u: sum(1 for o in owner.values() if o == u))
    next(s for s in sims if s.url == leaving).stop()
    deadline = time.monotonic() + 15
    for gw in gateways:  # each replica notices by its own health checks
        while httpx.get(f"{gw.url}/readyz", timeout=5).json()["tiers"]["small"]["ready_workers"] != 2:
            assert time.monotonic() < deadline, "the stopped worker stayed in the pool"
            time.sleep(0.1)
    rids = send_all(gateways, rounds=3)
    wait_for_log(gateways, rids)
    after = workers_of(gateways, rids)
    for p, ws in after.items():
        assert len(ws) == 1, after
        if owner[p] != leaving:
            assert ws == {owner[p]}  # untouched by the departure
        else:
            assert ws != {leaving}


async def timed(client: httpx.AsyncClient, url: str, tenant: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = await client.post(
        f"{url}/v1/chat/completions",
        json=chat("short", "hi"),
        headers={"x-gateway-tenant": tenant},
    )
    return r.status_code, time.perf_counter() - t0


def test_a_flooding_tenant_leaves_a_trickle_its_turns(tmp_path: Path, keep: Callable[[Any], Any]) -> None:
    """One worker of capacity C = 2, a tenant holding 10 x C requests in flight: the other
    tenant's p50 stays within 3x its unloaded latency, and the flood gets the rest."""
    worker = keep(Sim("tiny-small", tmp_path, "--max-num-seqs", "2", "--ttft-ms", "200"))
    path = tmp_path / "policy.yaml"
    path.write_text(policy([worker.url], [UNUSED], "    max_inflight: 2\n    queue_timeout_ms: 30000\n"))
    gw = keep(Gateway(path, tmp_path, start_timeout=START_S))

    async def scenario() -> tuple[float, list[float], int, float]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
            alone = [(await timed(client, gw.url, "trickle"))[1] for _ in range(5)]
            stop = time.monotonic() + 6
            flood_ok = 0

            async def flooder() -> None:
                nonlocal flood_ok
                while time.monotonic() < stop:
                    status, _ = await timed(client, gw.url, "flood")
                    flood_ok += status == 200

            flood = [asyncio.create_task(flooder()) for _ in range(20)]
            await asyncio.sleep(1.0)  # the queue fills
            started = time.monotonic()
            loaded = []
            while time.monotonic() < stop - 0.5:
                status, took = await timed(client, gw.url, "trickle")
                assert status == 200
                loaded.append(took)
            window = time.monotonic() - started
            await asyncio.gather(*flood)
            return statistics.median(alone), loaded, flood_ok, window

    unloaded, loaded, flood_ok, _ = asyncio.run(scenario())
    assert len(loaded) >= 5
    assert statistics.median(loaded) <= 3 * unloaded, (unloaded, loaded)
    # capacity: 2 slots x 5 requests/s for ~7 s; the trickle takes at most one slot
    assert flood_ok >= 0.4 * 2 * 5 * 7, flood_ok
    assert worker.stats()["requests"] == flood_ok + len(loaded) + 5


def test_a_queue_deadline_is_a_503_with_retry_after_and_a_waiter_that_leaves_reaches_no_worker(
    tmp_path: Path, keep: Callable[[Any], Any]
) -> None:
    worker = keep(Sim("tiny-small", tmp_path, "--ttft-ms", "3000"))
    path = tmp_path / "policy.yaml"
    path.write_text(
        policy([worker.url], [UNUSED], "    max_inflight: 1\n    queue_timeout_ms: 400\n").replace(
            "    fallback: [frontier]\n", ""
        )
    )
    gw = keep(Gateway(path, tmp_path, start_timeout=START_S))

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            body = chat("short", "hi")
            busy = asyncio.create_task(client.post(f"{gw.url}/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)
            t0 = time.perf_counter()
            r = await client.post(f"{gw.url}/v1/chat/completions", json=body)
            took = time.perf_counter() - t0
            assert r.status_code == 503
            assert r.headers["retry-after"].isdigit()
            assert r.json()["error"]["code"] == "tier_saturated"
            assert 0.35 < took < 2.0
            # a client that leaves while queued: out of the queue, and no worker ever saw it
            leaving = asyncio.create_task(client.post(f"{gw.url}/v1/chat/completions", json=body))
            await asyncio.sleep(0.2)
            leaving.cancel()
            assert (await busy).status_code == 200

    asyncio.run(scenario())
    assert worker.stats()["requests"] == 1
    deadline = time.monotonic() + 5
    while len(entries(gw)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines = sorted(entries(gw).values(), key=lambda e: e["latency_ms"])
    refused = [e for e in lines if e["status"] == 503]
    assert len(refused) == 1 and refused[0]["worker"] is None
    gone = [e for e in lines if e["outcome"] == "client_disconnect"]
    assert len(gone) == 1 and gone[0]["worker"] is None  # no worker: no ledger record
    served = [e for e in lines if e["status"] == 200]
    assert len(served) == 1 and served[0]["queue_wait_ms"] == 0


def test_spill_to_the_fallback_only_past_the_bound(tmp_path: Path, keep: Callable[[Any], Any]) -> None:
    worker = keep(Sim("tiny-small", tmp_path, "--ttft-ms", "250"))
    frontier = keep(Sim("tiny-frontier", tmp_path))
    path = tmp_path / "policy.yaml"
    path.write_text(policy([worker.url], [frontier.url], "    max_inflight: 1\n", "    spill_after_ms: 400\n"))
    gw = keep(Gateway(path, tmp_path, start_timeout=START_S))

    async def scenario() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{gw.url}/v1/chat/completions"
            alone = [(await client.post(url, json=chat("short", "hi"))).headers["x-gateway-tier"] for _ in range(4)]
            burst = await asyncio.gather(*(client.post(url, json=chat("short", "hi")) for _ in range(6)))
            return alone, [r.headers["x-gateway-request-id"] for r in burst]

    alone, burst = asyncio.run(scenario())
    assert alone == ["small"] * 4  # one at a time: never queued, never spilled
    deadline = time.monotonic() + 5
    while not set(burst) <= set(entries(gw)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    logged = entries(gw)
    tiers = [logged[r]["tier"] for r in burst]
    assert "frontier" in tiers and "small" in tiers, tiers
    for r in burst:
        if logged[r]["tier"] == "small":
            assert logged[r]["queue_wait_ms"] < 400 + 150  # served on its tier within the bound
    spilled = [json.loads(x) for x in gw.log_lines() if '"event":"spilled"' in x]
    assert len(spilled) == tiers.count("frontier")


def test_a_queued_request_at_shutdown_is_a_503_shutting_down_and_billed_nothing(
    tmp_path: Path, keep: Callable[[Any], Any]
) -> None:
    from gateway import ledger_report, store

    redis_server = keep(RedisServer(tmp_path))
    worker = keep(Sim("tiny-small", tmp_path, "--tpot-ms", "20"))
    path = tmp_path / "policy.yaml"
    path.write_text(policy([worker.url], [UNUSED], "    max_inflight: 1\n    queue_timeout_ms: 30000\n"))
    gw = keep(
        Gateway(
            path,
            tmp_path,
            {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_SHUTDOWN_GRACE_S": "1"},
            start_timeout=START_S,
        )
    )
    body = chat("short", "hi", max_tokens=400)  # 8 s of generation: far beyond the grace period

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{gw.url}/v1/chat/completions"
            running = asyncio.create_task(client.post(url, json=body))
            deadline = time.monotonic() + 10
            while worker.stats()["requests"] < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            queued = asyncio.create_task(client.post(url, json=body))
            await asyncio.sleep(0.5)
            gw.proc.send_signal(signal.SIGTERM)
            return [await running, await queued]

    async def ledger() -> list[Any]:
        client = store.connect(redis_server.url, timeout_s=5)
        try:
            return [r async for r in ledger_report.records(client)]
        finally:
            await client.aclose()

    running, queued = asyncio.run(run())
    gw.proc.wait(timeout=10)
    for r in (running, queued):
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert worker.stats()["requests"] == 1  # the queued one never reached it
    records = asyncio.run(ledger())
    assert [r.request_id for r in records] == [running.headers["x-gateway-request-id"]]
    assert records[0].outcome == "shutdown"
