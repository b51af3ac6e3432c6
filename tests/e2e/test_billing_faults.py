"""Billed exactly once, whatever happened: time-outs, clients that leave, workers that fail, and
requests refused before any worker. Real redis-server, real simulator workers (which abort a
request whose connection closes, as vLLM does, and log every attempt by request id), a real
gateway process; the ledger is read back from Redis and compared with what the workers saw."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.ledger import STREAM, from_fields
from tests.procs import Gateway, RedisServer, Sim, free_port

pytestmark = pytest.mark.e2e

POLICY = """version: 1
auth: none
tiers:
  frontier:
    model: tiny-frontier
    workers: [{workers}]
    price: {{input: 3.00, output: 15.00}}
    timeouts: {{connect: 1, first_byte: 1, idle: 1}}
routes:
  - {{name: default, tier: frontier}}
limits:
  - {{scope: tenant, rpm: 3}}
"""


class Stack:
    def __init__(self, tmp: Path, workers: int = 2):
        self.redis = RedisServer(tmp)
        self.sims = [Sim("tiny-frontier", tmp) for _ in range(workers)]
        self.tmp = tmp
        self.gw: Gateway | None = None

    def start(self, urls: list[str] | None = None) -> Gateway:
        policy = self.tmp / "policy.yaml"
        urls = urls if urls is not None else [s.url for s in self.sims]
        policy.write_text(POLICY.format(workers=", ".join(f'{{url: "{u}"}}' for u in urls)))
        self.gw = Gateway(policy, self.tmp, {"GATEWAY_REDIS_URL": self.redis.url})
        return self.gw

    def ledger(self) -> dict[str, list[Any]]:
        with redis.Redis(port=self.redis.port) as c:
            records = [from_fields({k.decode(): v.decode() for k, v in f.items()}) for _, f in c.xrange(STREAM)]
        out: dict[str, list[Any]] = {}
        for r in records:
            out.setdefault(r.request_id, []).append(r)
        return out

    def attempts(self) -> dict[str, list[str]]:
        """Every attempt each worker saw, by request id: how it ended there."""
        out: dict[str, list[str]] = {}
        for s in self.sims:
            for rid, ends in s.stats()["outcomes"].items():
                out.setdefault(rid, []).extend(ends)
        return out

    def stop(self) -> None:
        if self.gw is not None:
            self.gw.stop()
        for s in self.sims:
            s.stop()
        self.redis.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    yield s
    s.stop()


def until(cond: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "auto",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def test_a_timed_out_generation_runs_once_is_aborted_and_billed_once(stack: Stack) -> None:
    for s in stack.sims:
        s.faults(tpot_ms=10)  # 300 tokens: 3 s, longer than first_byte (1 s)
    gw = stack.start()
    ids = []
    for _ in range(3):
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body(300), timeout=30)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "worker_timeout"
        gave_up = time.time()
        rid = r.headers["x-gateway-request-id"]
        ids.append(rid)
        until(lambda rid=rid: stack.attempts().get(rid))  # type: ignore[misc]
        aborted_at = max(s.stats()["aborted_at"].get(rid, 0) for s in stack.sims)
        assert aborted_at and aborted_at - gave_up < 1.0  # the worker saw the connection close at once
    attempts = stack.attempts()
    assert {rid: attempts[rid] for rid in ids} == {rid: ["aborted"] for rid in ids}  # one generation each, stopped
    until(lambda: len(stack.ledger()) == 3)
    ledger = stack.ledger()
    for rid in ids:
        (rec,) = ledger[rid]
        assert rec.outcome == "timeout" and rec.completion_tokens == 0 and rec.prompt_tokens > 0
        assert rec.attempts == 1


def test_a_client_that_leaves_a_plain_request_stops_the_worker_and_is_billed_once(stack: Stack) -> None:
    stack.sims[0].faults(tpot_ms=10)
    gw = stack.start([stack.sims[0].url])
    payload = json.dumps(body(500)).encode()
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(payload), payload)
        )
        until(lambda: stack.sims[0].stats()["requests"] == 1)
        left = time.time()
    until(lambda: stack.sims[0].stats()["aborted"] == 1, within=5)
    stats = stack.sims[0].stats()
    (rid,) = stats["outcomes"]
    assert stats["outcomes"][rid] == ["aborted"]
    assert stats["aborted_at"][rid] - left < 1.0
    until(lambda: rid in stack.ledger())
    (rec,) = stack.ledger()[rid]
    assert rec.outcome == "client_disconnect" and rec.completion_tokens == 0


def test_a_client_that_leaves_a_stream_is_billed_what_it_was_sent(stack: Stack) -> None:
    stack.sims[0].faults(tpot_ms=20)
    gw = stack.start([stack.sims[0].url])
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body(200, stream=True), timeout=30) as r:
        rid = r.headers["x-gateway-request-id"]
        received = 0
        for line in r.iter_lines():
            if '"content"' in line:
                received += 1
            if received >= 5:
                break
    until(lambda: stack.sims[0].stats()["aborted"] == 1, within=5)
    assert stack.attempts()[rid] == ["aborted"]
    until(lambda: rid in stack.ledger())
    (rec,) = stack.ledger()[rid]
    assert rec.outcome == "client_disconnect"
    assert 4 <= rec.completion_tokens < 200  # what the client was sent (the role chunk has no text)


def test_refused_before_any_worker_costs_no_quota(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = stack.start([dead])
    for _ in range(6):  # twice the limit of 3 rpm: every one refused by the gateway, none a 429
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body(5), timeout=10)
        assert r.status_code in (502, 503), r.text
    assert stack.ledger() == {}  # nothing reached a worker: nothing billed
    gw.stop()
    gw = stack.start()
    codes = [httpx.post(f"{gw.url}/v1/chat/completions", json=body(5), timeout=10).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]  # the whole limit was still there


def test_a_worker_error_after_it_got_the_request_is_billed_once(stack: Stack) -> None:
    for s in stack.sims:
        s.faults(error_rate=1.0)
    gw = stack.start()
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body(5), timeout=10)
    assert r.status_code == 502
    rid = r.headers["x-gateway-request-id"]
    assert sorted(stack.attempts()[rid]) == ["error", "error"]  # both workers tried, in turn
    until(lambda: rid in stack.ledger())
    (rec,) = stack.ledger()[rid]
    assert rec.outcome == "error" and rec.attempts == 2 and rec.prompt_tokens == 0


def test_a_stream_that_goes_idle_is_ended_aborted_and_billed_once(stack: Stack) -> None:
    stack.sims[0].faults(tpot_ms=1500)  # a token every 1.5 s: longer than the idle time-out (1 s)
    gw = stack.start([stack.sims[0].url])
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body(50, stream=True), timeout=30) as r:
        rid = r.headers["x-gateway-request-id"]
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1][6:])["error"]["code"] == "worker_stream_error"
    gave_up = time.time()
    until(lambda: stack.sims[0].stats()["aborted"] == 1, within=5)
    assert stack.sims[0].stats()["aborted_at"][rid] - gave_up < 1.0
    until(lambda: rid in stack.ledger())
    (rec,) = stack.ledger()[rid]
    assert rec.outcome == "timeout" and rec.completion_tokens == 1  # the one word the client was sent
