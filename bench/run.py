"""Gateway benchmark: added latency and throughput against the same request sent straight to a worker.

    make bench            (or: .venv/bin/python -m bench.run [--quick])

A simulator worker (zero latency model) and the load generator share CPU core 1; the gateway is
pinned to core 0, so the figures are "the gateway on one core". Concurrency 1 is measured with a
keep-alive Python client (the same client both ways, so its own cost cancels out in the
difference); concurrency 32 with wrk. Results go to bench/results/latest.md, which the README
quotes, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.procs import RedisServer, free_port, stop, wait_http

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Summarize the following article in one paragraph: " + "The city council met on Tuesday. " * 8
CHAT = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}


def body(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, **CHAT, "stream": stream}).encode()


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def sequential(port: int, payload: bytes, n: int, stream: bool) -> tuple[list[float], list[float]]:
    """Latencies (whole response) and, for streams, times to the first content chunk, in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    total, first = [], []
    headers = {"content-type": "application/json"}
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", payload, headers)
        r = conn.getresponse()
        if stream:
            t1 = None
            while True:
                line = r.readline()
                if not line:
                    break
                if t1 is None and b'"content":"' in line and b'"content":""' not in line:
                    t1 = time.perf_counter()
                if line.startswith(b"data: [DONE]"):
                    r.read()
                    break
            first.append(((t1 or time.perf_counter()) - t0) * 1000)
        else:
            r.read()
        assert r.status == 200, r.status
        total.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return total, first


def wrk(port: int, payload: bytes, seconds: int, conns: int = 32) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{payload.decode()}]]\n"
        )
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script.name]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True, check=True
    ).stdout
    os.unlink(script.name)

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rps, out
    return {
        "rps": float(rps.group(1)),
        "p50": ms("50%"),
        "p99": ms("99%"),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


class Run:
    """One target's figures: sequential latencies (and first-token times) and wrk results, per stream mode."""

    def __init__(self, port: int, model: str, n: int, seconds: int):
        self.seq = {s: sequential(port, body(model, s), n, s) for s in (False, True)}
        self.load = {s: wrk(port, body(model, s), seconds) for s in (False, True)}

    def p(self, stream: bool, q: float, first: bool = False) -> float:
        xs = self.seq[stream][1 if first else 0]
        return statistics.median(xs) if q == 50 else percentile(xs, q)


def loop_stall_ms(chars: int) -> tuple[float, float]:
    """Longest event-loop stall while counting a prompt of ``chars`` characters, inline vs on a thread."""
    from gateway import tokens
    from gateway.schemas import Endpoint, decode_request

    text = ("The quick brown fox jumps over the lazy dog. " * (chars // 45 + 1))[:chars]
    parsed = decode_request(
        Endpoint.CHAT, json.dumps({"model": "a", "messages": [{"role": "user", "content": text}]}).encode()
    )
    tokens.count_sync(parsed)

    async def measure(inline_chars: int) -> float:
        worst = 0.0
        done = False

        async def ticker() -> None:
            nonlocal worst
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0)
                now = time.perf_counter()
                worst = max(worst, now - last)
                last = now

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        await tokens.count(parsed, inline_chars)
        done = True
        await t
        return worst * 1000

    return asyncio.run(measure(10**9)), asyncio.run(measure(16_384))


def start(cmd: list[str], core: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", str(core), *cmd],
        cwd=ROOT,
        # several gateways at once: no metrics listeners (the metrics are still recorded per request)
        env={**os.environ, "GATEWAY_METRICS_PORT": "0", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def wrk_requests(port: int, payload: bytes, seconds: int, key: str | None) -> tuple[float, int]:
    """(requests/s, total requests) at concurrency 32, optionally with an API key."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{payload.decode()}]]\n"
        )
        if key:
            script.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", "-s", script.name]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True, check=True
    ).stdout
    os.unlink(script.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rps and total and not bad, out
    return float(rps.group(1)), int(total.group(1))


def admission(sim_port: int, seconds: int, rounds: int = 5) -> str:
    """Throughput with API keys + rate limits (one Redis) against none, and Redis commands per request."""
    import asyncio

    import redis

    from gateway import store
    from gateway.keys import KeyStore

    server = RedisServer(Path(tempfile.mkdtemp()), core=1)
    procs: list[subprocess.Popen[bytes]] = []
    url = server.url
    try:
        r = redis.Redis(port=server.port)

        async def make_key() -> str:
            c = store.connect(url, timeout_s=2)
            _, secret = await KeyStore(c).create("bench")
            await c.aclose()
            return secret

        key = asyncio.run(make_key())
        base = (
            "version: 1\ntiers:\n  t:\n    model: bench-model\n"
            f"    workers: [{{url: 'http://127.0.0.1:{sim_port}'}}]\n    price: {{input: 1, output: 2}}\n"
            "routes:\n  - {name: default, tier: t}\n"
        )
        policies = {
            "off": base + "auth: none\n",
            "on": base + "limits:\n  - {scope: tenant, rpm: 100000000, tpm: 10000000000, concurrency: 10000}\n"
            "  - {scope: key, rpm: 100000000}\n",
        }
        ports = {}
        for name, text in policies.items():
            policy = Path(tempfile.mkdtemp()) / f"{name}.yaml"
            policy.write_text(text)
            ports[name] = free_port()
            cmd = [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(ports[name])]
            gw = start(cmd, 0, {"GATEWAY_REDIS_URL": url, "GATEWAY_LOG_FORMAT": "json"})
            procs.append(gw)
            wait_http(f"http://127.0.0.1:{ports[name]}/readyz", gw)
            wrk_requests(ports[name], body("auto", False), 2, key)  # warm up
        # Alternate runs of the two (only one is under load at a time) and take medians: the shared
        # core's noise is of the same order as the difference being measured.
        runs: dict[str, list[float]] = {"off": [], "on": []}
        total = 0
        calls: dict[str, int] = {}
        for _ in range(rounds):
            for name in ("off", "on"):
                time.sleep(0.3)  # the previous run's last batched writes land before counting starts
                r.config_resetstat()
                rps, n = wrk_requests(ports[name], body("auto", False), seconds, key)
                runs[name].append(rps)
                if name == "on":  # Redis commands of the configuration with admission only
                    time.sleep(0.3)
                    total += n
                    for k, v in r.info("commandstats").items():
                        calls[k.removeprefix("cmdstat_")] = calls.get(k.removeprefix("cmdstat_"), 0) + v["calls"]
        r.close()
    finally:
        for p in procs:
            stop(p)
        server.stop()
    off_rps = statistics.median(runs["off"])
    on_rps = statistics.median(runs["on"])
    per_request = {k: v / total for k, v in calls.items() if not k.startswith(("config", "info", "hello"))}
    detail = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_request.items(), key=lambda kv: -kv[1]))
    return (
        f"Admission (API key + 2 limits, 4 counters, one local Redis), non-streaming, concurrency 32, median of "
        f"{rounds} alternating {seconds}s runs: **{on_rps:.0f}** requests/s with it, {off_rps:.0f} without "
        f"(**{(1 - on_rps / off_rps) * 100:.1f}%** less). Redis commands per request: {detail} "
        "— of the `evalsha` calls, one per request is admission (the only blocking round trip); the others are "
        "settlements and ledger writes, batched in pipelines after the response. Key lookups are cached for 1 s. "
        "Both configurations write every request's ledger record."
    )


def report(direct: Run, via: dict[str, Run], stall: tuple[float, float], adm: str) -> str:
    names = list(via)
    rows = [
        f"Machine: {machine()}. Gateway pinned to one core (taskset -c 0); worker simulator and load generator "
        f"on the other. Logging, metrics and the ledger on (a JSON log line, metrics and a ledger record per request). "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| measure | direct to worker | " + " | ".join(f"via gateway, `{n}` transport" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]

    def line(label: str, first: str, cells: list[str]) -> None:
        rows.append(f"| {label} | {first} | " + " | ".join(cells) + " |")

    for stream in (False, True):
        kind = "streaming" if stream else "non-streaming"
        line(
            f"{kind}, concurrency 1: p50 / p99 latency (ms)",
            f"{direct.p(stream, 50):.2f} / {direct.p(stream, 99):.2f}",
            [f"{r.p(stream, 50):.2f} / {r.p(stream, 99):.2f}" for r in via.values()],
        )
        line(
            f"{kind}, concurrency 1: **added** p50 / p99 (ms)",
            "—",
            [
                f"**{r.p(stream, 50) - direct.p(stream, 50):.2f}** / {r.p(stream, 99) - direct.p(stream, 99):.2f}"
                for r in via.values()
            ],
        )
        if stream:
            line(
                "streaming, concurrency 1: time to first token p50 (ms)",
                f"{direct.p(True, 50, first=True):.2f}",
                [
                    f"{r.p(True, 50, first=True):.2f} (added {r.p(True, 50, True) - direct.p(True, 50, True):.2f})"
                    for r in via.values()
                ],
            )
        d = direct.load[stream]
        cells = []
        for r in via.values():
            w = r.load[stream]
            errors = f", {w['errors']:.0f} errors" if w["errors"] else ""
            cells.append(f"**{w['rps']:.0f}** ({w['p50']:.1f} / {w['p99']:.1f}){errors}")
        line(
            f"{kind}, concurrency 32: requests/s (p50 / p99 ms)",
            f"{d['rps']:.0f} ({d['p50']:.1f} / {d['p99']:.1f})",
            cells,
        )
    rows += [
        "",
        adm,
        "",
        f"Tokenizing a 1 MB prompt: longest event-loop stall {stall[0]:.1f} ms when counted inline, "
        f"{stall[1]:.1f} ms when counted on a thread (what the gateway does above 16 kB of text).",
    ]
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs (for a smoke test)")
    ap.add_argument("--transports", default="worker,aiohttp,httpx", help="gateway transports to compare")
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("taskset"):
        sys.exit("bench needs wrk and taskset: apt-get install -y wrk util-linux")
    n, seconds = (300, 3) if args.quick else (2000, 10)

    sim_port = free_port()
    sim = start([sys.executable, "-m", "workers.sim", "--port", str(sim_port), "--model", "bench-model"], 1)
    # the gateways' own Redis: every figure includes writing the ledger record of each request
    redis_server = RedisServer(Path(tempfile.mkdtemp()), core=1)
    redis_env = {"GATEWAY_REDIS_URL": redis_server.url}
    procs = [sim]
    try:
        wait_http(f"http://127.0.0.1:{sim_port}/health", sim)
        policy = Path(tempfile.mkdtemp()) / "bench.yaml"
        policy.write_text(
            "version: 1\nauth: none\ntiers:\n  t:\n    model: bench-model\n"
            f"    workers: [{{url: 'http://127.0.0.1:{sim_port}'}}]\n    price: {{input: 1, output: 2}}\n"
            "routes:\n  - {name: default, tier: t}\n"
        )
        direct = Run(sim_port, "bench-model", n, seconds)
        via = {}
        for transport in args.transports.split(","):
            gw_port = free_port()
            cmd = [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(gw_port)]
            gw = start(cmd, 0, {"GATEWAY_TRANSPORT": transport, "GATEWAY_LOG_FORMAT": "json", **redis_env})
            procs.append(gw)
            wait_http(f"http://127.0.0.1:{gw_port}/readyz", gw)
            sequential(gw_port, body("auto", False), 200, False)  # warm up
            via[transport] = Run(gw_port, "auto", n, seconds)
            stop(gw)
        adm = admission(sim_port, seconds, 2 if args.quick else 5)
        stall = loop_stall_ms(1_000_000)
    finally:
        for p in procs:
            stop(p)
        redis_server.stop()
    text = report(direct, via, stall, adm)
    out = ROOT / "bench" / "results" / ("quick.md" if args.quick else "latest.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
