"""Where the governed gateway's CPU goes: a sampling profile and syscall counts per request.

    .venv/bin/python -m bench.profile [--seconds 20] [--py-spy PATH]     (py-spy: pip install py-spy)

Starts the benchmark's stack (bench/stack.py) with one governed gateway pinned to core 0, puts it
under wrk at concurrency 32 from core 1 and records it with py-spy (native frames included, so
that the garbage collector shows up). Every sample is charged to one cost centre: the innermost
frame of the stack that belongs to a known stage of the request (auth, body parse, tokens,
admission, dispatch, ...) — so the Redis client's work under ``Admitter.reserve`` counts as
admission, and the HTTP server's work under the handler's ``send`` as uvicorn. Then ``strace -c``
counts the gateway's syscalls per request: at concurrency 32, at concurrency 1, and idle (wake-ups
per second with no traffic). Requests are counted by the simulator worker (every request reaches it
once). Writes bench/results/profile.md; the text under its "Analysis" heading is kept across runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from bench.load import Client, body, interleaved, wrk
from bench.run import commit, machine
from bench.stack import MODEL, ROOT, Stack
from tests.procs import free_port

OUT = ROOT / "bench" / "results" / "profile.md"
KEEP = "## Analysis"


# (cost centre, frame pattern): the innermost frame matching one of these decides. A frame reads
# "function (path/to/file.py:line)" (paths as py-spy shortens them) or, native, "function (library.so)".
def _in(*paths: str) -> str:
    return "|".join(rf"\((?:.*/)?{re.escape(p)}" for p in paths)


STAGES = [
    ("auth (API key check)", _in("gateway/auth.py")),
    ("body read (ASGI receive)", r"^_read_body \("),
    ("body parse (decode_request)", r"^(decode_request|_validation_message) \("),
    ("tokens (prompt count, tiktoken)", _in("gateway/tokens.py", "tiktoken")),
    ("routing (facts, decide)", _in("gateway/facts.py", "gateway/policy/decide.py")),
    (
        "admission reserve (build + RESP round trip)",
        r"^(Admitter\.)?(reserve|_call|_compiled_for|_late|AdmitCall\.payload|rate_limit_headers|RedisClock\.\w+) \(",
    ),
    ("settlement (batched, after the response)", _in("gateway/admission.py", "gateway/batching.py")),
    (
        "dispatch + worker transport (HTTP/1.1 to the worker)",
        _in("gateway/dispatch.py", "gateway/transport.py", "httpx/", "h11/"),
    ),
    ("stream relay", _in("gateway/streaming.py")),
    ("response usage parse", r"^read_usage \("),
    ("ledger (record + batched write)", _in("gateway/ledger.py")),
    ("metrics (prometheus_client)", _in("gateway/metrics.py", "prometheus_client/")),
    ("logging (structlog, JSON line, write)", _in("structlog/", "gateway/logging.py")),
    ("finish (exchange bookkeeping)", _in("gateway/exchange.py")),
    (
        "background (health checks, load scrapes, policy, key last-used)",
        _in("gateway/pool.py", "gateway/registry.py", "gateway/policy/", "redis/"),
    ),
    ("litestar (routing, Request, ASGIResponse, headers)", _in("litestar/", "multidict")),
    (
        "handler glue (api.py, respond.py: DisconnectWatch, ASGI messages, awaits)",
        _in("gateway/api.py", "gateway/respond.py"),
    ),
    ("uvicorn/httptools (HTTP parse, ASGI messages, send)", _in("uvicorn/protocols/", "gateway/edge.py", "httptools/")),
]
# When no stage matched: the Redis connection's reply callbacks, else the event loop itself.
COMPONENTS = [
    ("Redis replies (RESP parse, futures)", _in("gateway/resp.py")),
    ("event loop (uvloop: socket reads, callbacks, task switches)", _in("asyncio/", "uvloop", "anyio/")),
]
GC = re.compile(r"^(gc_collect_main|gc_collect\w*|collect_generations) \(")
IDLE = re.compile(r"^(epoll_wait|epoll_pwait|epoll_pwait2) \(")
# a thread pool's thread blocked in its queue's get (native, so py-spy cannot tell it is waiting)
IDLE_THREAD = re.compile(r"^_worker \(concurrent/futures/thread\.py")
SYSCALLS = re.compile(
    r"^(read|write|writev|readv|sendmsg|recvmsg|sendto|recvfrom|getpid|clock_gettime|futex|openat|newfstatat"
    r"|fstat|stat|lseek|close) \(lib"
)
COMPILED = [(name, re.compile(rx)) for name, rx in STAGES + COMPONENTS]
STAGE_NAMES = {n for n, _ in STAGES}


def classify(frames: list[str]) -> str:
    """The cost centre of one sample (frames outermost first)."""
    if any(GC.match(f) for f in frames):
        return "GC (cyclic collector)"
    for stage_pass in (True, False):
        for frame in reversed(frames):  # innermost first
            for name, rx in COMPILED:
                if (name in STAGE_NAMES) == stage_pass and rx.search(frame):
                    return name
    return "other (interpreter, unattributed)"


def leaf_python(frames: list[str]) -> str:
    for frame in reversed(frames):
        if ".py:" in frame:
            return re.sub(r"\(.*?(site-packages/|lib/python3\.\d+/|/work/[^/]+/)", "(", frame)
    return frames[-1] if frames else "?"


def sim_requests(stack: Stack) -> int:
    return int(httpx.get(f"http://127.0.0.1:{stack.sim_port}/sim/stats", timeout=5).json()["requests"])


@dataclass
class Samples:
    centres: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)  # innermost Python frame
    syscalls: Counter[str] = field(default_factory=Counter)  # samples inside a syscall, by name
    total: int = 0
    idle: int = 0


def parse(raw: str) -> Samples:
    """py-spy's raw output: one line per distinct stack, "thread;outer;...;inner count"."""
    out = Samples()
    for line in raw.splitlines():
        stack_text, _, count = line.rpartition(" ")
        frames = stack_text.split(";")
        n = int(count)
        if frames and (IDLE.match(frames[-1]) or IDLE_THREAD.match(leaf_python(frames))):
            out.idle += n  # waiting for events, or a pool thread waiting for work: not CPU
            continue
        out.centres[classify(frames)] += n
        out.leaves[leaf_python(frames)] += n
        if frames and (m := SYSCALLS.match(frames[-1])):
            out.syscalls[m.group(1)] += n
        out.total += n
    return out


def profile(stack: Stack, pid: int, port: int, key: str, seconds: float, py_spy: str) -> Samples:
    raw = stack.tmp / "profile.txt"
    load = threading.Thread(target=wrk, args=(port, body("auto", False), seconds + 4), kwargs={"key": key})
    load.start()
    time.sleep(2)
    record = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--duration", str(int(seconds)), "--native"]
    subprocess.run(
        ["taskset", "-c", "1", *record, "--format", "raw", "--output", str(raw)], check=True, capture_output=True
    )
    load.join()
    return parse(raw.read_text())


def strace_counts(stack: Stack, pid: int, seconds: float) -> tuple[Counter[str], int]:
    """Syscalls of the gateway (all threads) for ``seconds``, and the requests served meanwhile."""
    out = stack.tmp / f"strace-{time.monotonic_ns()}.txt"
    before = sim_requests(stack)
    proc = subprocess.Popen(
        ["taskset", "-c", "1", "strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(seconds)
    proc.terminate()
    proc.wait(timeout=30)
    served = sim_requests(stack) - before - 2  # the two stats calls are not requests through the gateway
    calls: Counter[str] = Counter()
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls, max(served, 0)


def under_load(stack: Stack, pid: int, port: int, key: str, seconds: float, conns: int) -> tuple[Counter[str], int]:
    stop = threading.Event()

    def sequential() -> None:
        client = Client(port, body("auto", False), False, key)
        while not stop.is_set():
            client.one()
        client.close()

    if conns == 1:
        load = threading.Thread(target=sequential)
    else:
        load = threading.Thread(target=wrk, args=(port, body("auto", False), seconds + 3), kwargs={"key": key})
    load.start()
    time.sleep(1)
    try:
        return strace_counts(stack, pid, seconds)
    finally:
        stop.set()
        load.join()


def syscall_table(runs: dict[str, tuple[Counter[str], int, float]]) -> list[str]:
    names = sorted(
        {n for c, _, _ in runs.values() for n in c}, key=lambda n: -max(c[n] / max(r, 1) for c, r, _ in runs.values())
    )
    rows = ["| syscall | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for name in names[:14]:
        cells = []
        for label, (calls, reqs, secs) in runs.items():
            cells.append(
                f"{calls[name] / secs:.1f}/s" if label.startswith("idle") else f"{calls[name] / max(reqs, 1):.2f}"
            )
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append(
        "| **all** | "
        + " | ".join(
            f"{sum(c.values()) / s:.1f}/s" if label.startswith("idle") else f"**{sum(c.values()) / max(r, 1):.2f}**"
            for label, (c, r, s) in runs.items()
        )
        + " |"
    )
    return rows


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_") and ("_sum" in line or "_count" in line) and "bucket" not in line:
            name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


def redis_rtt_us(port: int, n: int = 2000) -> float:
    """Median PING round trip to the Redis on core 1 from core 0 (where the gateway runs)."""
    import socket

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                sock.recv(64)
                times.append((time.perf_counter() - t0) * 1e6)
    finally:
        os.sched_setaffinity(0, before)
    return statistics.median(times)


def latency_split(stack: Stack, n: int) -> list[str]:
    """At concurrency 1: where a request's time goes, from the gateways' own histograms (means)."""
    metrics_port = {config: free_port() for config in ("ungoverned", "governed")}
    gws = {c: stack.gateway(c, env={"GATEWAY_METRICS_PORT": str(p)}) for c, p in metrics_port.items()}
    clients = {"direct": Client(stack.sim_port, body(MODEL, False), False)}
    clients |= {c: Client(g.port, body("auto", False), False, g.key) for c, g in gws.items()}
    interleaved(clients, 300)  # warm up
    before = {c: scrape(p) for c, p in metrics_port.items()}
    out = interleaved(clients, n)
    after = {c: scrape(p) for c, p in metrics_port.items()}
    for c in clients.values():
        c.close()
    for g in gws.values():
        g.stop()
        stack.gateways.remove(g)

    def mean(config: str, name: str) -> float:
        d = {k: after[config].get(k, 0.0) - before[config].get(k, 0.0) for k in after[config]}
        return d[f"{name}_sum"] / d[f"{name}_count"] * 1000

    rows = [
        "| at concurrency 1, mean (ms) | direct | ungoverned | governed |",
        "|---|---|---|---|",
        "| client-side latency | "
        + " | ".join(f"{statistics.mean(out[c][0]):.3f}" for c in ("direct", "ungoverned", "governed"))
        + " |",
        "| gateway: arrival → worker called (auth, parse, tokens, routing, admission) | — | "
        + " | ".join(f"{mean(c, 'gateway_overhead_seconds'):.3f}" for c in gws)
        + " |",
        "| gateway: arrival → worker's first byte | — | "
        + " | ".join(f"{mean(c, 'gateway_time_to_first_byte_seconds'):.3f}" for c in gws)
        + " |",
        "| gateway: arrival → last byte handed to the server | — | "
        + " | ".join(f"{mean(c, 'gateway_request_duration_seconds'):.3f}" for c in gws)
        + " |",
    ]
    rows.append(
        f"\nRedis PING round trip from core 0 to the redis-server on core 1 (median of 2,000): "
        f"{redis_rtt_us(stack.redis.port):.0f} µs — the floor under the admission round trip."
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy", help="the py-spy executable")
    args = ap.parse_args()
    for tool in ("wrk", "strace", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"bench.profile needs {tool} (apt-get install -y {tool})")
    stack = Stack()
    try:
        gw = stack.gateway("governed")
        key = stack.key
        wrk(gw.port, body("auto", False), 3, key=key)  # warm up
        cpu0 = gw.cpu()
        plain = wrk(gw.port, body("auto", False), 5, key=key)
        cpu = gw.cpu() - cpu0
        rps, busy, us = plain.rps, cpu / (plain.requests / plain.rps), cpu / plain.requests * 1e6
        samples = profile(stack, gw.pid, gw.port, key, args.seconds, args.py_spy)
        strace_s = max(3.0, args.seconds / 4)
        runs = {
            "concurrency 32 (per request)": (*under_load(stack, gw.pid, gw.port, key, strace_s, 32), strace_s),
            "concurrency 1 (per request)": (*under_load(stack, gw.pid, gw.port, key, strace_s, 1), strace_s),
        }
        time.sleep(1)
        calls, _ = strace_counts(stack, gw.pid, strace_s)
        runs["idle (per second)"] = (calls, 0, strace_s)
        gw.stop()
        stack.gateways.remove(gw)
        split = latency_split(stack, 2000)
    finally:
        stack.close()

    command = "python -m bench.profile " + " ".join(sys.argv[1:])
    rows = [
        "# Where the governed gateway's time goes",
        "",
        f"Machine: {machine()}. {time.strftime('%Y-%m-%d %H:%M')}, commit {commit()}. Reproduce: `{command.strip()}` "
        "(needs py-spy — `pip install py-spy` — strace and wrk; runs as root or with ptrace permission).",
        "",
        "Governed configuration of `bench/run.py` (API key, tenant rpm + tpm and key rpm limits, ledger, metrics, "
        "JSON log line per request), gateway pinned to core 0, non-streaming requests from wrk -c32 on core 1. "
        f"py-spy at 250 Hz with native frames for {args.seconds:g} s: {samples.total} samples. Each sample is "
        "charged to the innermost frame that belongs to a stage of the request (bench/profile.py, `STAGES`).",
        "",
        f"Unprofiled, the same load: {rps:.0f} requests/s with the gateway's process {busy * 100:.0f}% busy — "
        f"**{us:.0f} µs of CPU per request** ({1e6 / us:.0f} requests per CPU-second), which the µs column "
        "divides by share.",
        "",
        "| cost centre | share of the gateway's CPU samples | ≈ µs per request |",
        "|---|---|---|",
    ]
    total = samples.total
    for name, n in samples.centres.most_common():
        rows.append(f"| {name} | {n / total * 100:.1f}% | {n / total * us:.0f} |")
    rows += [
        "",
        "Across the stages: time inside syscalls (the innermost native frame), whichever stage made them — "
        + ", ".join(f"`{k}` {v / total * 100:.1f}%" for k, v in samples.syscalls.most_common())
        + f"; samples left out above as waiting (in `epoll_pwait`, or a thread pool's idle thread): {samples.idle}.",
        "",
        "Innermost Python frames (self time, native code under them included), top 25:",
        "",
        "| frame | share |",
        "|---|---|",
    ]
    for name, n in samples.leaves.most_common(25):
        rows.append(f"| `{name}` | {n / total * 100:.1f}% |")
    requests = [r for _, r, _ in runs.values() if r]
    rows += [
        "",
        f"Syscalls of the gateway process (`strace -c -f -p PID` for {strace_s:g} s each; requests counted by the "
        f"simulator worker: {', '.join(str(r) for r in requests)}). strace slows every syscall down, so under "
        "concurrency 32 more requests share each wake-up than without it: read those counts as a lower bound. "
        "At concurrency 1 nothing is shared, so those counts are exact. `epoll_wait` is the event loop waking up.",
        "",
        *syscall_table(runs),
        "",
        "Where the time of one request goes at concurrency 1 (2,000 requests per gateway, alternating in blocks; "
        "means from the gateways' own histograms, `GATEWAY_METRICS_PORT` on for this part):",
        "",
        *split,
        "",
    ]
    kept = ""
    if OUT.exists() and KEEP in OUT.read_text():
        kept = OUT.read_text()[OUT.read_text().index(KEEP) :]
    OUT.write_text("\n".join(rows) + "\n" + (kept or f"{KEEP}\n\n(to be written)\n"))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
