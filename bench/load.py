"""Load generators: a keep-alive client for latency at concurrency 1, wrk for throughput.

Concurrency 1 uses the same Python client against every target (its own cost cancels out in the
difference "via gateway - direct"), and ``interleaved`` runs the targets in alternating blocks so
that noise from other work on the machine lands on all of them alike. Concurrency 32 uses wrk
pinned to the load generator's core; every run is checked for errors (non-2xx answers and socket
errors), and a run with any is reported as such.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass

PROMPT = "Summarize the following article in one paragraph: " + "The city council met on Tuesday. " * 8
CHAT = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}


def body(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, **CHAT, "stream": stream}).encode()


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


class Client:
    """One keep-alive connection; ``one()`` sends a request and returns (latency, first token) in ms."""

    def __init__(self, port: int, payload: bytes, stream: bool, key: str | None = None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.payload = payload
        self.stream = stream
        self.headers = {"content-type": "application/json"}
        if key:
            self.headers["authorization"] = f"Bearer {key}"

    def one(self) -> tuple[float, float | None]:
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", self.payload, self.headers)
        r = self.conn.getresponse()
        t1 = None
        if self.stream:
            while True:
                line = r.readline()
                if not line:
                    break
                if t1 is None and b'"content":"' in line and b'"content":""' not in line:
                    t1 = time.perf_counter()
                if line.startswith(b"data: [DONE]"):
                    r.read()
                    break
        else:
            r.read()
        if r.status != 200:
            raise RuntimeError(f"status {r.status} from port {self.conn.port}")
        t2 = time.perf_counter()
        return (t2 - t0) * 1000, ((t1 or t2) - t0) * 1000 if self.stream else None

    def close(self) -> None:
        self.conn.close()


def sequential(
    port: int, payload: bytes, n: int, stream: bool, key: str | None = None
) -> tuple[list[float], list[float]]:
    """Latencies (whole response) and, for streams, times to the first content chunk, in ms."""
    client = Client(port, payload, stream, key)
    total, first = [], []
    for _ in range(n):
        t, f = client.one()
        total.append(t)
        if f is not None:
            first.append(f)
    client.close()
    return total, first


def interleaved(clients: dict[str, Client], n: int, block: int = 100) -> dict[str, tuple[list[float], list[float]]]:
    """``n`` requests per client, in alternating blocks of ``block``."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in clients}
    done = 0
    while done < n:
        size = min(block, n - done)
        for name, client in clients.items():
            total, first = out[name]
            for _ in range(size):
                t, f = client.one()
                total.append(t)
                if f is not None:
                    first.append(f)
        done += size
    return out


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers + socket errors
    error_kinds: str  # e.g. "3 timeout" (wrk's time-out is 2 s)
    cpu_s: float  # wrk's own CPU time


def wrk(
    port: int, payload: bytes, seconds: float, conns: int = 32, key: str | None = None, core: str = "1"
) -> WrkResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{payload.decode()}]]\n"
        )
    cmd = ["taskset", "-c", core, "wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", "-s", script.name]
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        out = subprocess.run(
            [*cmd, f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(script.name)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    assert rps and total, out
    kinds = {}
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        kinds["non-2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        kinds.update(zip(("connect", "read", "write", "timeout"), (int(x) for x in m.groups()), strict=True))
    errors = sum(kinds.values())
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        p50_ms=ms("50%"),
        p99_ms=ms("99%"),
        errors=errors,
        error_kinds=", ".join(f"{v} {k}" for k, v in kinds.items() if v),
        cpu_s=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    )
