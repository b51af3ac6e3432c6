"""Placement measured: prefix-aware vs least-load on REAL vLLM, and fair queueing on simulators.

    .venv/bin/python -m bench.placement [--articles 40] [--concurrency 6] [--skip-vllm] [--skip-fairness]

1. Two real vLLM CPU workers (``python -m workers launch``, the tiny small model, prefix caching on,
   a KV cache of ``--blocks`` blocks so that it cannot hold every article) in one tier, behind two
   gateways that differ only in the tier's ``placement`` (``least_load`` and ``prefix``). A media
   pipeline's workload: every article goes through three tasks (summarize, classify, tag), the
   article first and the task after it — the layout that lets a prefix cache reuse a document — and
   the three calls of an article are spread among other articles' calls. Each placement gets its
   own articles of the same shape, so neither starts with the other's cache. Measured: vLLM's own
   ``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`` (summed over the workers,
   deltas over the phase), TTFT p50/p99 of the streams, and the load cap (from the clients' own
   request intervals and the worker the gateway logged for each: the chosen worker's in-flight
   count when a request started, against ``ceil((1 + eps) x (in flight + 1) / workers)``).
2. Fairness (simulator, ``--max-num-seqs 4``): one tenant keeps 40 requests in flight, another sends
   one at a time; each tenant's latency and share, without ``max_inflight`` (requests queue in the
   engine's FIFO) and with ``max_inflight: 4`` (they queue at the gateway, in fair order).

Results go to bench/results/placement.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.run import machine
from gateway.placement import EPSILON
from tests.procs import Gateway, RedisServer, Sim, free_port, stop
from workers import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "summarize": "Task: write a short summary of the article above for the front page, in two sentences.",
    "classify": "Task: classify the article above into one category: news, sport, business, science, health.",
    "tag": "Task: list five keywords for the article above, one per line, most important first.",
}
WORDS = tiny_model._VOCABULARY.split()


def article(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def workload(seed: int, articles: int, words: int) -> list[tuple[int, str, str]]:
    """(article number, task, article text) in pipeline order: each article's three calls are
    spread among other articles' calls (a window of eight articles, shuffled)."""
    rng = random.Random(seed)
    texts = [article(rng, words) for _ in range(articles)]
    calls = [(i, task, texts[i]) for i in range(articles) for task in TASKS]
    out: list[tuple[int, str, str]] = []
    window = 8 * len(TASKS)
    for start in range(0, len(calls), window):
        chunk = calls[start : start + window]
        rng.shuffle(chunk)
        out += chunk
    return out


def body(task: str, text: str, max_tokens: int) -> dict[str, Any]:
    content = f"Article:\n{text}\n\n{TASKS[task]}"
    return {
        "model": "auto",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


async def prefix_counters(client: httpx.AsyncClient, urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        text = (await client.get(f"{url}/metrics")).text
        for line in text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total{"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total{"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def run_phase(
    gw: Gateway, workers: list[str], calls: list[tuple[int, str, str]], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    ttfts: list[float] = []
    intervals: list[tuple[float, float, str]] = []  # start, end, request id
    cached: list[int] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        h0, q0 = await prefix_counters(client, workers)
        queue = list(calls)
        t_start = time.perf_counter()

        async def one() -> None:
            while queue:
                _, task, text = queue.pop(0)
                t0 = time.perf_counter()
                first: float | None = None
                async with client.stream(
                    "POST", f"{gw.url}/v1/chat/completions", json=body(task, text, max_tokens)
                ) as r:
                    assert r.status_code == 200, await r.aread()
                    rid = r.headers["x-gateway-request-id"]
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if first is None and event.get("choices"):
                            first = time.perf_counter()
                        usage = event.get("usage")
                        if usage:
                            cached.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                end = time.perf_counter()
                ttfts.append(((first or end) - t0) * 1000)
                intervals.append((t0, end, rid))

        await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - t_start
        await asyncio.sleep(0.5)
        h1, q1 = await prefix_counters(client, workers)
    await asyncio.sleep(1.0)  # the gateway's log lines
    logged = {}
    for line in gw.log_lines():
        if '"event":"request"' in line:
            e = json.loads(line)
            logged[e["request_id"]] = e["worker"]
    # the load cap, from the clients' side: at each request's start, what each worker had in flight
    over = 0
    worst = 0.0
    per_worker: dict[str, int] = {}
    for t0, _, rid in intervals:
        worker = logged[rid]
        per_worker[worker] = per_worker.get(worker, 0) + 1
        busy = {w: 0 for w in workers}
        for s, e, other in intervals:
            if other != rid and s < t0 < e:
                busy[logged[other]] = busy.get(logged[other], 0) + 1
        cap = math.ceil((1 + EPSILON) * (sum(busy.values()) + 1) / len(workers))
        worst = max(worst, (busy[worker] + 1) / cap)
        over += busy[worker] + 1 > cap
    ttfts.sort()
    return {
        "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0,
        "hits": h1 - h0,
        "queries": q1 - q0,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, math.ceil(0.99 * len(ttfts)) - 1)],
        "cached_share": sum(cached) / max(1.0, q1 - q0),
        "requests": len(intervals),
        "rps": len(intervals) / wall,
        "over_cap": over,
        "worst_vs_cap": worst,
        "per_worker": sorted(per_worker.values()),
    }


VLLM_POLICY = """version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{a}"}}, {{url: "{b}"}}]
    price: {{input: 0.10, output: 0.40}}
    max_context: 4096
    placement: {placement}
    timeouts: {{connect: 2, first_byte: 120, idle: 60}}
routes:
  - {{name: default, tier: small}}
"""


def launch(profile: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "workers", "launch", "--profile", str(profile), "--tier", "small"]
    cmd += ["--port", str(port), "--redis", "", "--log-file", str(log)]
    with log.with_suffix(".launcher.log").open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 2400) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vLLM at {url} did not start")
        time.sleep(1)


def blocks_of(url: str) -> str:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            for part in line.split(","):
                if part.startswith("num_gpu_blocks="):
                    return part.split("=")[1].strip('"')
    return "?"


def vllm_bench(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, dict[str, Any]], str]:
    tiny_model.build(tmp / "small", "small")
    profile = tmp / "workers.yaml"
    extra = [
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--num-gpu-blocks-override",
        str(args.blocks),
        "--max-num-seqs",
        "8",
    ]
    profile.write_text(
        "version: 1\ntiers:\n  small:\n"
        f"    model: {tmp / 'small'}\n    tiny_model: small\n    served_model_name: tiny-small\n"
        "    max_model_len: 4096\n    dtype: float32\n    env: {VLLM_CPU_KVCACHE_SPACE: '1'}\n"
        "    startup_timeout_s: 2400\n"  # a shared, busy CPU: compiling took over 10 minutes
        f"    extra_args: {json.dumps(extra)}\n"
    )
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = [launch(profile, p, tmp / f"vllm-{p}.log") for p in ports]
    redis = RedisServer(tmp)
    gateways: dict[str, Gateway] = {}
    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_up(url, proc)
        for placement in ("least_load", "prefix"):
            path = tmp / f"policy-{placement}.yaml"
            path.write_text(VLLM_POLICY.format(a=urls[0], b=urls[1], placement=placement))
            gateways[placement] = Gateway(path, tmp, {"GATEWAY_REDIS_URL": redis.url}, start_timeout=300)
        time.sleep(1.5)
        # warm-up: the engines compile and allocate; short prompts that share no block with the articles
        warm = workload(999, 4, 60)
        asyncio.run(run_phase(gateways["least_load"], urls, warm, 2, 4))
        results = {}
        for seed, placement in enumerate(("least_load", "prefix")):
            calls = workload(seed, args.articles, args.words)
            results[placement] = asyncio.run(
                run_phase(gateways[placement], urls, calls, args.concurrency, args.max_tokens)
            )
            print(placement, results[placement], flush=True)
        note = f"{blocks_of(urls[0])} KV blocks of 128 tokens per worker"
        return results, note
    finally:
        for gw in gateways.values():
            gw.stop()
        for proc in procs:
            stop(proc, timeout=60)
        redis.stop()


SIM_POLICY = """version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{url}"}}]
    price: {{input: 0.10, output: 0.40}}
    timeouts: {{connect: 2, first_byte: 60, idle: 60}}
{extra}routes:
  - {{name: default, tier: small}}
"""


async def fairness_phase(url: str, flood: int, seconds: float) -> dict[str, Any]:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=flood + 8)) as client:

        async def timed(tenant: str) -> float:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers={"x-gateway-tenant": tenant})
            assert r.status_code == 200, r.text
            return (time.perf_counter() - t0) * 1000

        alone = [await timed("trickle") for _ in range(10)]
        stop_at = time.monotonic() + seconds
        flood_lat: list[float] = []
        trickle_lat: list[float] = []

        async def flooder() -> None:
            while time.monotonic() < stop_at:
                flood_lat.append(await timed("flood"))

        tasks = [asyncio.create_task(flooder()) for _ in range(flood)]
        await asyncio.sleep(1.0)
        while time.monotonic() < stop_at - 1.0:
            trickle_lat.append(await timed("trickle"))
        await asyncio.gather(*tasks)
    served = len(flood_lat) + len(trickle_lat)
    return {
        "alone_p50": statistics.median(alone),
        "trickle_p50": statistics.median(trickle_lat),
        "trickle_p99": sorted(trickle_lat)[max(0, math.ceil(0.99 * len(trickle_lat)) - 1)],
        "flood_p50": statistics.median(flood_lat),
        "trickle_n": len(trickle_lat),
        "flood_n": len(flood_lat),
        "flood_share": len(flood_lat) / served,
        "rps": served / seconds,
    }


def fairness_bench(tmp: Path, seconds: float) -> dict[str, dict[str, Any]]:
    sim = Sim("tiny-small", tmp, "--max-num-seqs", "4", "--ttft-ms", "500")
    out = {}
    try:
        for name, extra in (("without flow control", ""), ("with max_inflight: 4", "    max_inflight: 4\n")):
            path = tmp / f"fair-{len(out)}.yaml"
            path.write_text(SIM_POLICY.format(url=sim.url, extra=extra))
            gw = Gateway(path, tmp, start_timeout=300)
            try:
                out[name] = asyncio.run(fairness_phase(gw.url, 40, seconds))
                print(name, out[name], flush=True)
            finally:
                gw.stop()
    finally:
        sim.stop()
    return out


def report(
    vllm: tuple[dict[str, dict[str, Any]], str] | None, fair: dict[str, dict[str, Any]] | None, args: argparse.Namespace
) -> str:
    lines = [
        "# Placement",
        "",
        f"`python -m bench.placement` on {machine()}, {time.strftime('%Y-%m-%d')}. The CPU is shared with other work.",
        "",
    ]
    if vllm is not None:
        res, note = vllm
        ll, px = res["least_load"], res["prefix"]
        lines += [
            "## Prefix-aware vs least-load placement, two real vLLM workers",
            "",
            f"Two vLLM 0.32 CPU workers (tiny small model, float32, prefix caching on, {note}, "
            f"`--max-num-seqs 8`) in one tier. {args.articles} articles of {args.words} words x 3 tasks "
            f"per placement (article first, task after), streams of {args.max_tokens} tokens, "
            f"{args.concurrency} clients. Load cap eps = {EPSILON}.",
            "",
            "| | least_load | prefix | prefix / least_load |",
            "|---|---|---|---|",
            f"| vLLM prefix-cache hit rate (hits / queries, tokens) | {ll['hit_rate']:.1%} | {px['hit_rate']:.1%} "
            f"| **{px['hit_rate'] / max(ll['hit_rate'], 1e-9):.2f}x** |",
            f"| TTFT p50 (ms) | {ll['ttft_p50']:.0f} | {px['ttft_p50']:.0f} | {px['ttft_p50'] / ll['ttft_p50']:.2f}x |",
            f"| TTFT p99 (ms) | {ll['ttft_p99']:.0f} | {px['ttft_p99']:.0f} | {px['ttft_p99'] / ll['ttft_p99']:.2f}x |",
            f"| requests/s | {ll['rps']:.2f} | {px['rps']:.2f} | {px['rps'] / ll['rps']:.2f}x |",
            f"| requests per worker | {ll['per_worker']} | {px['per_worker']} | |",
            f"| starts above the load cap (worst: in flight / cap) | {ll['over_cap']} ({ll['worst_vs_cap']:.2f}) "
            f"| {px['over_cap']} ({px['worst_vs_cap']:.2f}) | |",
            f"| prompt tokens cached, from the answers' usage | {ll['cached_share']:.1%} "
            f"| {px['cached_share']:.1%} | |",
            "",
            "The load cap is checked from the clients' side: when each request started, the in-flight "
            "requests each worker had (the clients' own intervals, the worker from the gateway's log line) "
            "against `ceil((1 + eps) x (in flight + 1) / workers)`.",
            "",
        ]
    if fair is not None:
        lines += [
            "## Fairness: one tenant floods, another trickles (simulator)",
            "",
            "One simulator worker running 4 requests at once (`--max-num-seqs 4`, 500 ms each), so its "
            "capacity C = 4. Tenant `flood` keeps 40 requests (10 x C) in flight; tenant `trickle` sends "
            "one request at a time.",
            "",
            "| | trickle alone p50 (ms) | trickle p50 / p99 under flood (ms) | p50 vs alone | flood p50 (ms) "
            "| flood share of requests | requests/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in fair.items():
            lines.append(
                f"| {name} | {r['alone_p50']:.0f} | {r['trickle_p50']:.0f} / {r['trickle_p99']:.0f} "
                f"| {r['trickle_p50'] / r['alone_p50']:.1f}x | {r['flood_p50']:.0f} | {r['flood_share']:.1%} "
                f"| {r['rps']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--articles", type=int, default=48)
    ap.add_argument("--words", type=int, default=1200, help="words per article (about a token each)")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=80, help="KV blocks per worker (--num-gpu-blocks-override)")
    ap.add_argument("--fair-seconds", type=float, default=15.0)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-fairness", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-placement-"))
    fair = None if args.skip_fairness else fairness_bench(tmp, args.fair_seconds)
    vllm = None if args.skip_vllm else vllm_bench(args, tmp)
    text = report(vllm, fair, args)
    dest = ROOT / "bench" / "results" / "placement.md"
    if dest.exists() and (vllm is None or fair is None):  # keep the section this run skipped
        old = dest.read_text().split("\n## ")
        kept = [
            f"## {part.rstrip()}\n"
            for part in old[1:]
            if (part.startswith("Prefix") and vllm is None) or (part.startswith("Fairness") and fair is None)
        ]
        text = "\n".join([text.rstrip() + "\n", *kept])
    dest.write_text(text.rstrip() + "\n")
    print(text)


if __name__ == "__main__":
    main()
