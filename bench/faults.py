"""Fault scenarios as a load harness, with measured figures.

    .venv/bin/python -m bench.faults [--only NAME ...] [--quick]

Real processes throughout: a redis-server, simulator workers, gateway processes (tests/load.py
builds the stack and the load). Each scenario is a function ``(Context) -> Section`` registered in
``SCENARIOS``; it runs its own stack and returns a markdown section with what it measured —
requests, refused by code, billed (ledger records) against what the workers saw, leaked
(concurrency slots still held once traffic stopped), time to exit. To add a scenario, write the
function and add it to ``SCENARIOS``. Results go to bench/results/faults.md with the machine they
ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx

from bench.run import machine
from tests.load import (
    StressStack,
    Tally,
    cluster_failover_under_load,
    hammer,
    redis_fault_under_load,
    sigterm_under_load,
)
from tests.procs import ClusterServer, Gateway

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "faults.md"
MSG = [{"role": "user", "content": "hello there"}]


@dataclass
class Context:
    quick: bool
    tmp: Path

    def dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.lines.append("")

    def text(self, *paragraph: str) -> None:
        self.lines += [" ".join(paragraph), ""]

    def markdown(self) -> str:
        return "\n".join([f"## {self.title}", "", *self.lines])


def refused(t: Tally) -> str:
    """Outcomes other than 200, by status and code, e.g. ``503 overloaded: 12``."""
    bad = sorted((k, n) for k, n in t.outcomes.items() if k != "200")
    return ", ".join(f"{k}: {n}" for k, n in bad) or "none"


def overhead(gw: Gateway) -> tuple[float, float]:
    """(sum of seconds, count) of the gateway's own time before it calls a worker: auth, parsing,
    tokens, routing and admission — the Redis round trip and the wait to read its reply included."""
    text = httpx.get(gw.metrics_url, timeout=10).text  # the metrics listener, not the serving port
    found = dict(re.findall(r"^gateway_overhead_seconds_(sum|count) (\S+)$", text, re.M))
    return float(found["sum"]), float(found["count"])


def mean_ms(before: tuple[float, float], after: tuple[float, float]) -> str:
    n = after[1] - before[1]
    return f"{(after[0] - before[0]) / n * 1000:.1f}" if n else "-"


def wait_until(check: Callable[[], bool], timeout_s: float) -> float | None:
    """Seconds until ``check()`` held, or None if it did not within ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def in_flight_knee(ctx: Context) -> Section:
    """How the gateway degrades as requests in flight grow, shedding off: the default of
    GATEWAY_MAX_IN_FLIGHT comes from here."""
    s = Section("In flight vs latency, shedding off (how GATEWAY_MAX_IN_FLIGHT's default was chosen)")
    sizes = [50, 100, 200, 400, 800] if ctx.quick else [25, 50, 100, 200, 400, 800, 1200]
    stack = StressStack(ctx.dir("knee"), "--ttft-ms", "200", "--tpot-ms", "5")
    gw = stack.gateway(GATEWAY_MAX_IN_FLIGHT="1000000")
    body = {"model": "auto", "messages": MSG, "max_tokens": 16}  # 200 ms + 16 x 5 ms at the worker
    rows: list[list[object]] = []
    try:
        for n in sizes:
            asyncio.run(hammer(gw.url, body, connections=n, per_connection=2, headers=stack.headers))  # connect
            before = overhead(gw)
            t = asyncio.run(
                hammer(gw.url, body, connections=n, per_connection=max(4, 3000 // n), headers=stack.headers)
            )
            after = overhead(gw)
            rps = t.count("200") / t.seconds
            held = rps * statistics.fmean(t.latencies_ms) / 1000 if t.latencies_ms else 0.0  # Little's law
            rows.append(
                [
                    n,
                    t.requests,
                    f"{rps:.0f}",
                    f"{held:.0f}",
                    f"{t.percentile(50):.0f}",
                    f"{t.percentile(99):.0f}",
                    mean_ms(before, after),
                    refused(t),
                ]
            )
    finally:
        gw.stop()
        stack.stop()
    s.table(
        [
            "connections",
            "requests",
            "served/s",
            "in flight (served/s x mean latency)",
            "p50 ms",
            "p99 ms",
            "gateway overhead, mean ms",
            "refused",
        ],
        rows,
    )
    s.text(
        "One gateway process, one API key with limits far above the load, a real redis-server, one simulator",
        "worker per tier answering in 200 ms + 16 x 5 ms. Each client sends its requests one after another on",
        "its own keep-alive connection. Below saturation, doubling the clients doubles what is served and the",
        "latency stays the worker's; past it, what is served stays flat and every extra request in flight only",
        "adds queueing in the gateway — to its latency, and to the time it takes to read Redis's replies (the",
        "overhead column, admission's round trip included).",
    )
    return s


def thousand_connections(ctx: Context) -> Section:
    """1,000 concurrent connections on one process, with the default bound."""
    s = Section("1,000 concurrent connections on one gateway process")
    stack = StressStack(ctx.dir("thousand"), "--ttft-ms", "200", "--tpot-ms", "5")
    rows: list[list[object]] = []
    try:
        for run in range(2 if ctx.quick else 3):
            gw = stack.gateway()
            try:
                workers, billed = stack.worker_requests(), stack.ledger_records()
                body = {"model": "auto", "messages": MSG, "max_tokens": 16}
                before = overhead(gw)
                t = asyncio.run(
                    hammer(
                        gw.url,
                        body,
                        connections=1000,
                        per_connection=5,
                        headers=stack.headers,
                        honor_retry_after=True,
                        deadline_s=120,
                    )
                )
                after = overhead(gw)
                settled = wait_until(lambda: stack.held_slots() == 0, 10)
                seen = stack.worker_requests() - workers
                wait_until(lambda b=billed, w=seen: stack.ledger_records() - b >= w, 5)  # type: ignore[misc]
                rows.append(
                    [
                        run + 1,
                        t.requests,
                        t.count("200"),
                        refused(t),
                        f"{t.percentile(50):.0f} / {t.percentile(99):.0f}",
                        mean_ms(before, after),
                        seen,
                        stack.ledger_records() - billed,
                        stack.held_slots(),
                        "-" if settled is None else f"{settled:.1f}",
                    ]
                )
            finally:
                gw.stop()
    finally:
        stack.stop()
    s.table(
        [
            "run",
            "requests",
            "served (200)",
            "refused",
            "p50 / p99 ms (served, at the client)",
            "gateway overhead, mean ms",
            "worker requests",
            "billed (ledger records)",
            "leaked slots",
            "slots back to 0 after (s)",
        ],
        rows,
    )
    s.text(
        "1,000 clients on their own keep-alive connections, 5 requests each (a client told 503 overloaded",
        "waits its Retry-After, as the openai SDK backs off), against one gateway process with the default",
        "GATEWAY_MAX_IN_FLIGHT; Redis healthy throughout, limits far above the load (so any 429 or 503",
        "state_unavailable would be false). Shed requests are answered at once and never reach Redis or a",
        "worker. Latency at the client includes the load generator's own queueing (1,000 clients in one",
        "Python process on the same cores); the gateway's overhead is its own time before calling a worker.",
    )
    return s


def sigterm_x20(ctx: Context) -> Section:
    """20 SIGTERMs in a row, each with streams in flight that outlive the grace period."""
    grace = 1.0
    rounds = 5 if ctx.quick else 20
    s = Section(f"SIGTERM x {rounds} under load")
    stack = StressStack(ctx.dir("sigterm"), "--tpot-ms", "20")
    env = {"GATEWAY_SHUTDOWN_GRACE_S": str(grace)}
    streams = {"model": "auto", "messages": MSG, "max_tokens": 150, "stream": True}  # 3 s at the worker
    exits: list[float] = []
    outcomes: list[Tally] = []
    left: list[int] = []
    started: list[Gateway] = []

    def start() -> Gateway:
        started.append(stack.gateway(**env))
        return started[-1]

    async def run() -> None:
        for _ in range(rounds):
            gw = await asyncio.to_thread(start)
            end = await sigterm_under_load(
                gw, streams, connections=20, headers=stack.headers, after_s=0.3, wait_s=grace + 30
            )
            exits.append(end.exit_s)
            outcomes.append(end.load)
            left.extend(end.left_behind)

    try:
        workers, billed = stack.worker_requests(), stack.ledger_records()
        asyncio.run(run())
        seen = stack.worker_requests() - workers
        wait_until(lambda: stack.ledger_records() - billed >= seen, 5)
        settled = wait_until(lambda: stack.held_slots() == 0, 10)
        total = Tally()
        for t in outcomes:
            total.outcomes.update(t.outcomes)
        s.table(
            [
                "rounds",
                "streams",
                "outcomes at the client",
                "time to exit: median / max (s)",
                "processes left",
                "worker requests",
                "billed (ledger records)",
                "leaked slots",
            ],
            [
                [
                    rounds,
                    total.requests,
                    refused(total),
                    f"{statistics.median(exits):.2f} / {max(exits):.2f}",
                    len(left),
                    seen,
                    stack.ledger_records() - billed,
                    stack.held_slots() if settled is None else 0,
                ]
            ],
        )
    finally:
        for gw in started:
            gw.stop()
        stack.stop()
    s.text(
        f"GATEWAY_SHUTDOWN_GRACE_S={grace:g}. Each round starts a gateway, opens 20 streams that would take",
        "3 s, and sends SIGTERM 0.3 s later; the time to exit is from the signal to the process's end",
        f"(the bound asserted by tests/e2e/test_stress.py is grace + 5 s = {grace + 5:g} s). The streams are",
        "cut at the end of the grace period (the client sees the connection close).",
    )
    return s


def redis_faults(ctx: Context) -> Section:
    """Redis stalled and restarted under a concurrency-limited tenant's load."""
    s = Section("Redis stalled or restarted under load")
    rows = []
    for fault, mode in (
        ("stall", "fail_closed"),
        ("stall", "fail_open"),
        ("restart", "fail_closed"),
        ("restart", "fail_open"),
    ):
        run = redis_fault_under_load(ctx.dir(f"redis-{fault}-{mode}"), fault, mode)
        worker = len(run.worker_ids)
        rows.append(
            [
                fault,
                mode,
                sum(run.codes.values()),
                ", ".join(f"{k}: {n}" for k, n in sorted(run.codes.items())),
                f"{run.slots_back_s:.2f}",
                "all 12 admitted, the 13th 429" if run.full_limit == [200] * 12 + [429] else str(run.full_limit),
                worker,
                sum(run.ledger_ids.values()),
                sum(1 for v in run.worker_ids.values() if len(v) > 1),
            ]
        )
    s.table(
        [
            "fault",
            "on_redis_error",
            "requests",
            "statuses",
            "slots back to 0 after traffic (s)",
            "burst at the full limit (12) after",
            "worker requests",
            "billed (ledger records)",
            "generated twice",
        ],
        rows,
    )
    s.text(
        "10 clients loop for 4 s on a tenant limited to 12 concurrent requests (so any 429 is false), one",
        "simulator worker answering in ~50 ms; 1 s in, Redis sleeps 1.5 s (`DEBUG SLEEP`) or is killed and",
        "restarted 1 s later (append-only file kept). fail_closed answers 503 state_unavailable while Redis",
        "does not answer; fail_open admits against local limits. Then 13 slow requests at once: the limit",
        "must be whole again. Billed = ledger records, compared with the worker's requests by request id.",
    )
    return s


BILLING_POLICY = """version: 1
auth: none
tiers:
  t:
    model: tiny-frontier
    workers: [{workers}]
    price: {{input: 3.00, output: 15.00}}
    timeouts: {{connect: 1, first_byte: 1, idle: 1}}
routes:
  - {{name: default, tier: t}}
"""


def billing_faults(ctx: Context) -> Section:
    """Time-outs and clients leaving: nothing keeps generating, everything a worker saw is billed once."""
    import json
    import socket

    import redis as redis_py

    from gateway.ledger import STREAM, from_fields
    from tests.procs import RedisServer, Sim

    n = 5 if ctx.quick else 20
    tmp = ctx.dir("billing")
    server = RedisServer(tmp)
    sims = [Sim("tiny-frontier", tmp, "--tpot-ms", "10") for _ in range(2)]
    policy = tmp / "policy.yaml"
    policy.write_text(BILLING_POLICY.format(workers=", ".join(f'{{url: "{x.url}"}}' for x in sims)))
    gw = Gateway(policy, tmp, {"GATEWAY_REDIS_URL": server.url})

    def body(max_tokens: int, stream: bool = False) -> bytes:
        msg = {"model": "auto", "messages": MSG, "max_tokens": max_tokens, "stream": stream}
        return json.dumps(msg).encode()

    def timeout_case() -> tuple[list[str], list[float]]:
        codes, gave_up = [], []
        for _ in range(n):
            r = httpx.post(f"{gw.url}/v1/chat/completions", content=body(300), timeout=30)  # 3 s > first_byte 1 s
            codes.append(f"{r.status_code} {r.json()['error']['code']}" if r.status_code != 200 else "200")
            gave_up.append(time.time())
        return codes, gave_up

    def leave_plain() -> tuple[list[str], list[float]]:
        left = []
        for _ in range(n):
            payload = body(300)
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%b" % (len(payload), payload)
                )
                time.sleep(0.3)
            left.append(time.time())
        return ["client left"] * n, left

    def leave_stream() -> tuple[list[str], list[float]]:
        left = []
        for _ in range(n):
            with httpx.stream("POST", f"{gw.url}/v1/chat/completions", content=body(300, True), timeout=30) as r:
                for i, _line in enumerate(r.iter_lines()):
                    if i >= 10:
                        break
            left.append(time.time())
        return ["client left"] * n, left

    def snapshot() -> tuple[dict[str, list[str]], dict[str, float]]:
        outcomes: dict[str, list[str]] = {}
        aborted: dict[str, float] = {}
        for x in sims:
            st = x.stats()
            for rid, ends in st["outcomes"].items():
                outcomes.setdefault(rid, []).extend(ends)
            aborted.update(st["aborted_at"])
        return outcomes, aborted

    def ledger() -> dict[str, list[str]]:
        with redis_py.Redis(port=server.port) as c:
            out: dict[str, list[str]] = {}
            for _, f in c.xrange(STREAM):
                rec = from_fields({k.decode(): v.decode() for k, v in f.items()})
                out.setdefault(rec.request_id, []).append(rec.outcome)
            return out

    rows = []
    try:
        for name, case in (
            ("plain request, worker slower than first_byte", timeout_case),
            ("client leaves a plain request after 0.3 s", leave_plain),
            ("client leaves a stream after 10 lines", leave_stream),
        ):
            before, _ = snapshot()
            codes, ends = case()
            wait_until(lambda before=before: len(snapshot()[0]) - len(before) >= n, 10)
            time.sleep(0.5)
            after, aborted = snapshot()
            new = {rid: v for rid, v in after.items() if rid not in before}
            wait_until(lambda new=new: all(rid in ledger() for rid in new), 10)
            billed = ledger()
            lag = [
                aborted[rid] - end
                for rid, end in zip(sorted(new, key=lambda r: aborted.get(r, 0)), sorted(ends), strict=False)
                if rid in aborted
            ]
            rows.append(
                [
                    name,
                    n,
                    ", ".join(f"{k}: {v}" for k, v in sorted(__import__("collections").Counter(codes).items())),
                    sum(len(v) for v in new.values()),
                    sum(1 for v in new.values() if len(v) > 1),
                    sum(1 for v in new.values() if v == ["aborted"]),
                    f"{max(lag) * 1000:.0f}" if lag else "-",
                    sum(len(billed.get(rid, [])) for rid in new),
                    ", ".join(sorted({o for rid in new for o in billed.get(rid, [])})),
                ]
            )
    finally:
        gw.stop()
        for x in sims:
            x.stop()
        server.stop()
    s = Section("Time-outs and clients that leave: billed once, nothing left generating")
    s.table(
        [
            "case",
            "requests",
            "at the client",
            "worker attempts",
            "generated twice",
            "aborted at the worker",
            "worker saw the close after (max ms)",
            "billed (ledger records)",
            "outcomes billed",
        ],
        rows,
    )
    s.text(
        "One gateway, two simulator workers generating a token every 10 ms (300 tokens: 3 s), first_byte and",
        "idle time-outs 1 s, retry.on_timeout auto (a long non-streaming answer is not retried). 'Worker saw",
        "the close after' is from the moment the client had its 504 (or left) to the worker's abort.",
    )
    return s


def cluster_failover(ctx: Context) -> Section:
    """A Redis Cluster primary fails over under load: coordinated, and killed."""
    s = Section("A Redis Cluster primary fails over under load")
    rows = []
    cluster = ClusterServer(ctx.dir("cluster"))
    try:
        for how in ("failover", "kill"):
            for mode in ("fail_closed", "fail_open"):
                cluster.wait_ok()
                cluster.flush()
                run = cluster_failover_under_load(ctx.dir(f"cluster-{how}-{mode}"), cluster, how, mode)
                lost = len(run.answered_ids - set(run.ledger_ids))
                window = "none" if run.errors_from_s is None else f"{run.errors_from_s:.2f} → {run.errors_until_s:.2f}"
                rows.append(
                    [
                        "`CLUSTER FAILOVER` on the replica" if how == "failover" else "primary SIGKILLed",
                        mode,
                        sum(run.codes.values()),
                        ", ".join(f"{k}: {n}" for k, n in sorted(run.codes.items())),
                        f"{run.promoted_s:.2f}",
                        window,
                        f"{run.capped_admitted} / {run.capped_bound}",
                        len(run.worker_ids),
                        sum(run.ledger_ids.values()),
                        lost,
                        sum(1 for n in run.ledger_ids.values() if n > 1),
                        f"{run.slots_back_s:.2f}",
                    ]
                )
    finally:
        cluster.stop()
    s.table(
        [
            "fault",
            "on_redis_error",
            "requests",
            "statuses",
            "replica promoted after (s)",
            "errors from → until (s after the fault)",
            "capped tenant admitted / GCRA's bound",
            "worker requests",
            "billed (ledger records)",
            "answered but not billed",
            "billed twice",
            "slots back to 0 after traffic (s)",
        ],
        rows,
    )
    s.text(
        "A local cluster of 3 primaries + 3 replicas (`redis-server --cluster-enabled yes`, node time-out",
        "1 s), one gateway with `GATEWAY_REDIS_MODE=cluster`, one simulator worker (~20 ms to first token).",
        "8 clients loop for 6 s over two tenants whose keys live on the same primary as the ledger; one",
        "tenant (a quarter of the requests) is limited to 20 requests per minute (more 200s would break the",
        "limit: GCRA admits 20 at once, then one every 3 s, so the bound is 20 + the seconds until its last 200 ÷ 3);",
        "ledger batches count once the replica has them (`GATEWAY_LEDGER_WAIT_REPLICAS=1`). 1.5 s in, that",
        "primary fails: `CLUSTER FAILOVER` on its replica (a coordinated switch), or SIGKILL (the replica",
        "is promoted after the node time-out; the killed node is started again and rejoins as a replica).",
        "Billed = ledger records once the spool has drained, compared with the worker's requests by id.",
    )
    return s


SCENARIOS: dict[str, Callable[[Context], Section]] = {
    "cluster_failover": cluster_failover,
    "billing_faults": billing_faults,
    "redis_faults": redis_faults,
    "in_flight_knee": in_flight_knee,
    "thousand_connections": thousand_connections,
    "sigterm_x20": sigterm_x20,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="run only these scenarios")
    p.add_argument("--quick", action="store_true", help="fewer sizes and rounds (a smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = args.only or list(SCENARIOS)
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        ctx = Context(quick=args.quick, tmp=Path(tmp))
        for name in names:
            print(f"{name} …", file=sys.stderr, flush=True)
            started = time.monotonic()
            sections.append(SCENARIOS[name](ctx).markdown())
            print(f"{name}: {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    header = [
        "# Fault scenarios: measured figures",
        "",
        f"Machine: {machine()}. Load average when the run ended: {load:.1f} (the machine is shared; nothing is",
        "pinned — the gateway, Redis, the simulators and the load generator share its cores). Written by",
        f"`python -m bench.faults`{' --quick' if args.quick else ''}; {date.today().isoformat()}.",
        "",
    ]
    args.out.write_text("\n".join(header) + "\n" + "\n".join(sections))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
