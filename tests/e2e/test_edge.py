"""The serving port's edge, attacked over raw sockets: oversized heads are refused with 431 while
they stream in, slow clients are closed at the head and body deadlines, idle keep-alive
connections are closed, and normal traffic is unaffected meanwhile."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, Sim, two_tier_policy

pytestmark = pytest.mark.e2e

HEAD_S, BODY_S, KEEPALIVE_S = 2.0, 2.0, 1.0
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("edge")
    small, frontier = Sim("tiny-small", tmp), Sim("tiny-frontier", tmp)
    policy = tmp / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [frontier.url]))
    env = {
        "GATEWAY_HEAD_TIMEOUT_S": str(HEAD_S),
        "GATEWAY_BODY_TIMEOUT_S": str(BODY_S),
        "GATEWAY_KEEPALIVE_S": str(KEEPALIVE_S),
    }
    gateway = Gateway(policy, tmp, env)
    try:
        yield gateway
    finally:
        gateway.stop()
        small.stop()
        frontier.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def counter(gw: Gateway, name: str, label: str) -> float:
    found = re.search(rf"^{name}\{{{label}\}} (\S+)$", httpx.get(gw.metrics_url).text, re.M)
    return float(found.group(1)) if found else 0.0


def connect(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection, and when it closed it."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection is still open after {timeout:.1f} s") from None
    return got, time.monotonic()


def status_and_error(response: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def test_a_100_mb_header_is_refused_while_it_streams_in(gw: Gateway) -> None:
    before = rss_kib(gw.proc.pid)
    s = connect(gw)
    sent = [0]

    def send() -> None:
        chunk = b"a" * (1 << 20)
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
            for _ in range(100):
                s.sendall(chunk)
                sent[0] += len(chunk)
            s.sendall(b"\r\n\r\n")
        except OSError:
            pass  # the gateway closed the connection after answering: expected

    start = time.monotonic()
    sender = threading.Thread(target=send)
    sender.start()
    try:
        s.settimeout(5)
        response = s.recv(65536)
        elapsed = time.monotonic() - start
        grown = rss_kib(gw.proc.pid) - before
        sender.join(timeout=10)
    finally:
        s.close()
    status, error = status_and_error(response)
    assert status == 431 and elapsed < 1.0, (status, elapsed)
    assert error["type"] == "invalid_request_error" and error["code"] == "request_header_fields_too_large"
    assert grown < 20 * 1024, f"RSS grew {grown} KiB"
    assert rss_kib(gw.proc.pid) - before < 20 * 1024  # also once the client stopped sending
    assert httpx.get(f"{gw.url}/healthz").status_code == 200


def test_ten_thousand_headers_are_refused(gw: Gateway) -> None:
    refused = counter(gw, "gateway_request_heads_refused_total", 'reason="count"')
    with connect(gw) as s:
        s.sendall(
            b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(10_000)) + b"\r\n"
        )
        response, _ = read_until_closed(s, 5)
    status, error = status_and_error(response)
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    assert "100 header fields" in error["message"]
    assert counter(gw, "gateway_request_heads_refused_total", 'reason="count"') == refused + 1


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        ("/healthz", {"x-fill": "a" * 60_000}, 200),  # under 64 KiB in all: served
        ("/healthz", {"x-fill": "a" * 66_000}, 431),  # over, in one header
        ("/healthz", {f"x-fill-{i}": "a" * 1_000 for i in range(70)}, 431),  # over, spread out
        ("/healthz?" + "q" * 70_000, {}, 431),  # the request target counts too
        ("/healthz", {f"x-h{i}": "v" for i in range(98)}, 200),  # 98 + host + connection = 100 headers
        ("/healthz", {f"x-h{i}": "v" for i in range(99)}, 431),  # 101
    ],
    ids=["60k", "66k-one", "70k-many", "70k-url", "100-headers", "101-headers"],
)
def test_the_head_limits_are_exact_in_one_write(gw: Gateway, target: str, headers: dict[str, str], status: int) -> None:
    head = f"GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with connect(gw) as s:
        s.sendall(head.encode())
        response, _ = read_until_closed(s, 5)
    assert int(response.split(b" ", 2)[1]) == status


def test_a_client_sending_one_byte_a_second_is_disconnected_at_the_head_deadline(gw: Gateway) -> None:
    closed = counter(gw, "gateway_slow_clients_closed_total", 'phase="head"')
    with connect(gw) as s:
        start = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        s.settimeout(1.0)
        response, closed_at = b"", None
        while closed_at is None and time.monotonic() - start < HEAD_S + 3:
            try:
                s.send(b"a")
                chunk = s.recv(65536)  # waits up to a second: one byte a second
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            response += chunk
            if not chunk:
                closed_at = time.monotonic()
    assert closed_at is not None, "still connected"
    elapsed = closed_at - start
    assert HEAD_S - 0.2 < elapsed < HEAD_S + 1.0, elapsed
    status, error = status_and_error(response)
    assert status == 408 and error["code"] == "request_timeout"
    assert counter(gw, "gateway_slow_clients_closed_total", 'phase="head"') == closed + 1


def test_slowloris_sockets_are_all_closed_and_health_stays_fast(gw: Gateway) -> None:
    n = 300
    closed = counter(gw, "gateway_slow_clients_closed_total", 'phase="head"')
    sockets = [connect(gw) for _ in range(n)]
    try:
        for s in sockets:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ")
        start = time.monotonic()
        slowest = 0.0
        with httpx.Client() as client:
            while time.monotonic() - start < HEAD_S + 0.5:
                t0 = time.perf_counter()
                assert client.get(f"{gw.url}/healthz").status_code == 200
                slowest = max(slowest, time.perf_counter() - t0)
                time.sleep(0.05)
        assert slowest < 0.5, slowest
        deadline = start + HEAD_S + 2.0
        for s in sockets:
            _, when = read_until_closed(s, max(0.01, deadline - time.monotonic()))
            assert when < deadline
    finally:
        for s in sockets:
            s.close()
    assert counter(gw, "gateway_slow_clients_closed_total", 'phase="head"') == closed + n
    assert httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_a_body_that_stalls_is_cut_off_at_the_body_deadline(gw: Gateway) -> None:
    closed = counter(gw, "gateway_slow_clients_closed_total", 'phase="body"')
    with connect(gw) as s:
        s.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{"model"')
        start = time.monotonic()
        _, when = read_until_closed(s, BODY_S + 3)
    assert BODY_S - 0.2 < when - start < BODY_S + 1.0, when - start
    assert counter(gw, "gateway_slow_clients_closed_total", 'phase="body"') == closed + 1


def test_idle_keep_alive_connections_are_closed(gw: Gateway) -> None:
    with connect(gw) as s:
        for _ in range(2):  # the connection serves several requests, then idles
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            s.settimeout(5)
            response = b""
            while not response.endswith(b'{"status":"ok"}'):
                response += s.recv(65536)
            assert response.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        rest, when = read_until_closed(s, KEEPALIVE_S + 3)
    assert rest == b"" and KEEPALIVE_S - 0.2 < when - start < KEEPALIVE_S + 1.0


def test_normal_traffic_is_unaffected(gw: Gateway) -> None:
    headers = {f"x-meta-{i}": "v" * 500 for i in range(50)}  # 25 KB of headers: well within the limits
    with httpx.Client() as client:
        for _ in range(20):  # one keep-alive connection, requests back to back
            r = client.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 200, r.text
        streamed = client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        assert client.get(f"{gw.url}/v1/models").status_code == 200  # auth: none: no key needed
    with connect(gw) as s:  # pipelined requests, in one write: answered in order
        s.sendall(
            b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * 2 + b"GET /readyz HTTP/1.1\r\nconnection: close\r\n\r\n"
        )
        answers, _ = read_until_closed(s, 5)
    assert answers.count(b"HTTP/1.1 200 OK") == 3 and answers.endswith(b"}") and b'"status":"ready"' in answers


def test_the_edge_holds_with_several_processes(tmp_path: Path) -> None:
    """`gateway serve --workers N` hands the protocol to every process."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy(["http://127.0.0.1:9"], ["http://127.0.0.1:9"]))  # no worker needed
    gw = Gateway(policy, tmp_path, {"GATEWAY_HEAD_TIMEOUT_S": "1"}, "--workers", "2")
    try:
        for _ in range(4):  # new connections: both processes answer
            with connect(gw) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-h: v\r\n" * 200 + b"\r\n")
                response, _ = read_until_closed(s, 5)
            assert response.startswith(b"HTTP/1.1 431")
        sockets = [connect(gw) for _ in range(8)]
        for s in sockets:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
        for s in sockets:
            response, _ = read_until_closed(s, 3)
            assert response.startswith(b"HTTP/1.1 408")
            s.close()
        assert httpx.get(f"{gw.url}/v1/models").status_code == 200
        assert counter(gw, "gateway_slow_clients_closed_total", 'phase="head"') == 8  # counted across processes
    finally:
        gw.stop()
