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
from tests.load import StressStack, Tally, hammer, sigterm_under_load
from tests.procs import Gateway

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
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
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


SCENARIOS: dict[str, Callable[[Context], Section]] = {
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
