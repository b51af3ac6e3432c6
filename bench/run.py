"""Gateway benchmark: what the gateway adds, governed and ungoverned, against the same request sent
straight to a worker.

    make bench            (or: .venv/bin/python -m bench.run [--quick] [--workers 1,2] [--litellm VENV])

A simulator worker (zero-latency model), the gateways' redis-server and the load generator share
CPU core 1; the gateway is pinned to core 0, so the figures are "the gateway on one core". Two
gateway configurations run side by side (bench/stack.py): **governed** — an API key, rpm and tpm
limits far above the load, the ledger, metrics and a JSON log line per request, what a real
deployment runs — and **ungoverned** (``auth: none``, no limits). Concurrency 1 is measured with a
keep-alive Python client, the targets alternating in blocks (bench/load.py); concurrency 32 with
wrk, several alternating runs per target, median taken, each checked for 0 errors. ``--workers``
measures ``gateway serve --workers N`` (governed) for each N. Results go to
bench/results/latest.md (``--quick``: quick.md) with the machine, the configuration, the command
and the load other programs put on the machine meanwhile; a full run also appends its headline
figures to bench/results/history.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.load import Client, WrkResult, body, interleaved, percentile, sequential, wrk
from bench.stack import MODEL, ROOT, GatewayProc, Stack, cpu_seconds, machine_busy_seconds, rss_mib, start
from tests.procs import free_port, stop, wait_http

__all__ = ["machine", "percentile", "sequential"]  # bench.vllm uses these

RESULTS = ROOT / "bench" / "results"
LITELLM_KEY = "sk-bench-litellm-master-key"
LITELLM_N = 1000
LITELLM_SOURCE = (
    "issue 18: LiteLLM's proxy on the same core, same loopback upstream, measured on this machine before "
    "this benchmark could run it (79 req/s at concurrency 32, +14.7 ms added at concurrency 1)"
)


@dataclass
class Target:
    """One column of the table: something that answers /v1/chat/completions."""

    name: str
    port: int
    model: str = "auto"
    key: str | None = None
    gateway: GatewayProc | None = None
    pids: list[int] = field(default_factory=list)  # processes whose CPU is "the target's"
    external: str = ""  # another product (LiteLLM): its version
    seq: dict[bool, tuple[list[float], list[float]]] = field(default_factory=dict)
    load: dict[bool, list[tuple[WrkResult, float, float]]] = field(default_factory=dict)  # (wrk, cpu s, others)

    def p(self, stream: bool, q: float, first: bool = False) -> float:
        xs = self.seq[stream][1 if first else 0]
        return statistics.median(xs) if q == 50 else percentile(xs, q)

    def best(self, stream: bool) -> tuple[WrkResult, float, float]:
        """The run with the median requests/s."""
        runs = sorted(self.load[stream], key=lambda r: r[0].rps)
        return runs[len(runs) // 2]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)


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


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no", "gateway") else "")


def measured_load(target: Target, stack: Stack, stream: bool, seconds: float) -> None:
    """One wrk run at concurrency 32 against ``target``, with the CPU the target used and the CPU
    used meanwhile by processes that are not part of the benchmark (other work on the machine)."""
    payload = body(target.model, stream)
    cpu0, side0, busy0, self0 = target.cpu(), stack.side_cpu(), machine_busy_seconds(), time.process_time()
    t0 = time.monotonic()
    result = wrk(target.port, payload, seconds, key=target.key)
    wall = time.monotonic() - t0
    cpu = target.cpu() - cpu0
    side = stack.side_cpu() - side0
    ours = cpu + (side if target.gateway else 0.0) + result.cpu_s + time.process_time() - self0
    others = max(0.0, (machine_busy_seconds() - busy0 - ours) / wall)
    target.load.setdefault(stream, []).append((result, cpu, others))


def litellm_target(venv: Path, sim_port: int, tmp: Path) -> tuple[Target, subprocess.Popen[bytes]]:
    """LiteLLM's proxy on core 0, in the cheapest configuration it has: no database, so no virtual
    keys, budgets or spend logs — only its master key is checked."""
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: auto\n    litellm_params:\n"
        f"      model: openai/{MODEL}\n      api_base: http://127.0.0.1:{sim_port}/v1\n      api_key: none\n"
        "litellm_settings:\n  telemetry: false\n"
    )
    port = free_port()
    proc = start(
        [str(venv / "bin" / "litellm"), "--config", str(config), "--port", str(port), "--num_workers", "1"],
        "0",
        {
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from GitHub at start
            "LITELLM_MASTER_KEY": LITELLM_KEY,  # it refuses to start without one
        },
        tmp / "litellm.log",
    )
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout=180)
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = Target("LiteLLM proxy (master key only)", port, key=LITELLM_KEY, pids=[proc.pid], external=version)
    return target, proc


@dataclass
class WorkersRun:
    n: int
    cores: str
    runs: list[tuple[WrkResult, float, dict[int, float], float, float, float]] = field(default_factory=list)
    rss: dict[int, float] = field(default_factory=dict)  # after the runs, per serving process
    supervisor_rss: float = 0.0

    def best(self) -> tuple[WrkResult, float, dict[int, float], float, float, float]:
        runs = sorted(self.runs, key=lambda r: r[0].rps)
        return runs[len(runs) // 2]


def workers_runs(stack: Stack, counts: list[int], seconds: float, rounds: int) -> list[WorkersRun]:
    """Governed ``gateway serve --workers N`` for each N: N = 1 on core 0; N ≥ 2 on every core (the
    simulator, Redis and wrk keep running on core 1: on this machine there is no third core)."""
    every = ",".join(str(c) for c in range(os.cpu_count() or 1))
    out = [WorkersRun(n, "0" if n == 1 else every) for n in counts]
    gws = {w.n: stack.gateway("governed", w.cores, workers=w.n) for w in out}
    payload = body("auto", False)
    try:
        for w in out:
            wrk(gws[w.n].port, payload, 2, key=stack.key)  # warm up every process
        for _ in range(rounds):
            for w in out:
                gw = gws[w.n]
                pids = gw.pids()
                c0 = {p: cpu_seconds(p) for p in pids}
                side0, busy0 = stack.side_cpu(), machine_busy_seconds()
                t0 = time.monotonic()
                result = wrk(gw.port, payload, seconds, key=stack.key)
                wall = time.monotonic() - t0
                per = {p: (cpu_seconds(p) - c0[p]) / wall for p in pids}
                side = (stack.side_cpu() - side0) / wall
                busy = (machine_busy_seconds() - busy0) / wall
                w.runs.append((result, wall, per, side, result.cpu_s / wall, busy))
        for w in out:
            gw = gws[w.n]
            w.rss = {p: rss_mib(p) for p in gw.pids()}
            w.supervisor_rss = rss_mib(gw.pid) if w.n > 1 else 0.0
    finally:
        for gw in gws.values():
            gw.stop()
            stack.gateways.remove(gw)
    return out


def redis_commands(r: redis.Redis, requests: int) -> str:
    calls = {
        k.removeprefix("cmdstat_"): v["calls"]
        for k, v in r.info("commandstats").items()
        if not k.startswith(("cmdstat_config", "cmdstat_info", "cmdstat_hello"))
    }
    return ", ".join(f"{k} {v / requests:.3f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]))


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


def fmt3(a: float, b: float, c: float) -> str:
    return f"{a:.2f} / {b:.2f} / {c:.2f}"


def report(
    targets: list[Target],
    n: int,
    seconds: float,
    rounds: int,
    command: str,
    loads: tuple[tuple[float, ...], tuple[float, ...]],
    adm: str,
    procs: list[WorkersRun],
    stall: tuple[float, float],
    litellm: str,
) -> str:
    direct, via = targets[0], targets[1:]
    others = [r[2] for t in via for s in (False, True) for r in t.load[s]]
    busy = loads[0][0] > 0.5 or max(others) > 0.1
    rows = [
        f"Machine: {machine()}. {time.strftime('%Y-%m-%d %H:%M')}, commit {commit()}.",
        "",
        f"Command: `{command}`. Gateway pinned to one core (taskset -c 0); the simulator worker (zero-latency "
        "model), the gateways' redis-server and the load generator on the other. Concurrency 1: "
        f"{n} requests per target and mode with one keep-alive Python client, the targets alternating in blocks "
        f"of 100; concurrency 32: wrk -t1 -c32, {rounds} alternating runs of {seconds:g} s per target, the "
        "median shown.",
        "",
        "Configurations: **governed** — `auth: api_key` with a real key in the gateway's own redis-server, a "
        "tenant limit (rpm + tpm) and a per-key rpm limit far above the load (admission runs, nothing is "
        "refused), the ledger writing every request's record to Redis, metrics recorded per request, a JSON "
        "log line per request written to a file: what a real deployment runs. **ungoverned** — `auth: none`, "
        "no limits (ledger, metrics and logging still on). Both run `GATEWAY_METRICS_PORT=0` (no metrics "
        "listener; the metrics are still recorded).",
        "",
        f"Machine load: load average {loads[0][0]:.2f} / {loads[0][1]:.2f} / {loads[0][2]:.2f} before the "
        f"benchmark started, {loads[1][0]:.2f} at the end; CPU used by other programs during the "
        f"concurrency-32 runs: median {statistics.median(others):.2f}, max {max(others):.2f} cores."
        + (
            " **Shared/busy machine: other programs were using the cores, so these figures are noisy (lower "
            "throughput, longer tails) — re-run on a quiet machine for reference figures.**"
            if busy
            else ""
        ),
        "",
        "| measure | direct to worker | " + " | ".join(t.name for t in via) + " |",
        "|---|---|" + "---|" * len(via),
    ]

    def line(label: str, first: str, cells: list[str]) -> None:
        rows.append(f"| {label} | {first} | " + " | ".join(cells) + " |")

    for stream in (False, True):
        kind = "streaming" if stream else "non-streaming"
        line(
            f"{kind}, concurrency 1: p50 / p99 / p99.9 latency (ms)",
            fmt3(direct.p(stream, 50), direct.p(stream, 99), direct.p(stream, 99.9)),
            [fmt3(t.p(stream, 50), t.p(stream, 99), t.p(stream, 99.9)) for t in via],
        )
        line(
            f"{kind}, concurrency 1: **added** p50 / p99 / p99.9 (ms)",
            "—",
            [
                f"**{t.p(stream, 50) - direct.p(stream, 50):.2f}** / {t.p(stream, 99) - direct.p(stream, 99):.2f}"
                f" / {t.p(stream, 99.9) - direct.p(stream, 99.9):.2f}"
                for t in via
            ],
        )
        if stream:
            line(
                "streaming, concurrency 1: time to first token p50 / p99 (ms)",
                f"{direct.p(True, 50, True):.2f} / {direct.p(True, 99, True):.2f}",
                [
                    f"{t.p(True, 50, True):.2f} / {t.p(True, 99, True):.2f} (added "
                    f"**{t.p(True, 50, True) - direct.p(True, 50, True):.2f}** / "
                    f"{t.p(True, 99, True) - direct.p(True, 99, True):.2f})"
                    for t in via
                ],
            )

        def cell(t: Target, stream: bool = stream) -> str:
            w, _, _ = t.best(stream)
            errors = sum(r[0].errors for r in t.load[stream])
            kinds = "; ".join(r[0].error_kinds for r in t.load[stream] if r[0].errors)
            bold = "**" if t is not direct else ""
            return f"{bold}{w.rps:.0f}{bold} ({w.p50_ms:.1f} / {w.p99_ms:.1f}), " + (
                f"**{errors} errors** ({kinds})" if errors else "0 errors"
            )

        line(f"{kind}, concurrency 32: requests/s (p50 / p99 ms)", cell(direct), [cell(t) for t in via])

    def cpu_cell(t: Target) -> str:
        w, cpu, _ = t.best(False)
        wall = w.requests / w.rps
        return f"{cpu / wall * 100:.0f}% busy, {w.requests / cpu:.0f} req per CPU-second" if cpu else "—"

    line("non-streaming, concurrency 32: CPU of the target's process(es)", cpu_cell(direct), [cpu_cell(t) for t in via])
    governed = next((t for t in via if t.name == "governed"), None)
    if governed is not None:
        rps = governed.best(False)[0].rps
        p50 = governed.p(False, 50) - direct.p(False, 50)
        p99 = governed.p(False, 99) - direct.p(False, 99)
        ttft = governed.p(True, 50, True) - direct.p(True, 50, True)

        def mark(ok: bool) -> str:
            return "met" if ok else "**not met**"

        rows += [
            "",
            "Issue 18's targets for the governed gateway (same machine, same run): ≥ 3,000 requests/s at "
            f"concurrency 32 with 0 errors — {rps:.0f}, {mark(rps >= 3000 and not governed.best(False)[0].errors)}; "
            f"added p50 ≤ 0.6 ms — {p50:.2f}, {mark(p50 <= 0.6)}; added p99 ≤ 2 ms — {p99:.2f}, {mark(p99 <= 2)}; "
            f"streaming added time to first token ≤ 0.7 ms — {ttft:.2f}, {mark(ttft <= 0.7)}.",
        ]
    if litellm:
        rows += [
            "",
            f"LiteLLM's proxy: LiteLLM {litellm} in its own virtualenv, no database (so no "
            "virtual keys, budgets or spend logs: it does less per request than the governed gateway), one "
            f"process on core 0, measured after the others at concurrency 1 ({LITELLM_N} requests per mode). wrk "
            "counts a request unanswered after 2 s as a timeout error.",
        ]
    else:
        rows += ["", f"LiteLLM (not re-run here; `--litellm VENV` runs it): {LITELLM_SOURCE}."]
    if adm:
        rows += ["", adm]
    if procs:
        rows += [
            "",
            "**Several processes** (`gateway serve --workers N`, governed, non-streaming, concurrency 32, "
            f"median of {rounds} alternating runs). N = 1 is pinned to core 0; N = 2 gets both cores, which it "
            "shares with the simulator, Redis and wrk (this machine has no third core), so at N = 2 the machine, "
            "not the gateway, is the limit when the columns to the right add up to 2 cores.",
            "",
            "| N | cores | requests/s | scaling | CPU per gateway process (cores) | RSS per process (MiB) | "
            "simulator + Redis (cores) | wrk (cores) | machine busy (of 2 cores) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = procs[0].best()[0].rps
        for w in procs:
            result, _, per, side, wrk_cores, busy = w.best()
            rss = " + ".join(f"{w.rss[p]:.0f}" for p in per if p in w.rss)
            if w.supervisor_rss:
                rss += f" (supervisor {w.supervisor_rss:.0f})"
            errors = sum(r[0].errors for r in w.runs)
            kinds = "; ".join(r[0].error_kinds for r in w.runs if r[0].errors)
            rows.append(
                f"| {w.n} | {w.cores} | **{result.rps:.0f}**{f' ({errors} errors: {kinds})' if errors else ''} | "
                f"{result.rps / base:.2f}x | " + " + ".join(f"{c:.2f}" for c in per.values()) + f" | {rss} | "
                f"{side:.2f} | {wrk_cores:.2f} | {busy:.2f} |"
            )
    rows += [
        "",
        f"Tokenizing a 1 MB prompt: longest event-loop stall {stall[0]:.1f} ms when counted inline, "
        f"{stall[1]:.1f} ms when counted on a thread (what the gateway does above 16 kB of text).",
    ]
    return "\n".join(rows) + "\n"


def history_row(targets: list[Target], change: str, loads: tuple[float, ...]) -> str:
    direct = targets[0]

    def fig(t: Target) -> str:
        w, cpu, _ = t.best(False)
        return (
            f"{w.rps:.0f} req/s ({w.requests / cpu:.0f} per CPU-s); +{t.p(False, 50) - direct.p(False, 50):.2f} / "
            f"+{t.p(False, 99) - direct.p(False, 99):.2f} / +{t.p(False, 99.9) - direct.p(False, 99.9):.2f} ms; "
            f"TTFT +{t.p(True, 50, True) - direct.p(True, 50, True):.2f} ms"
        )

    by = {t.name: t for t in targets}
    cells = [fig(by[n]) if n in by else "—" for n in ("governed", "ungoverned")]
    return f"| {time.strftime('%Y-%m-%d')} | {commit()} | {change} | {cells[0]} | {cells[1]} | {loads[0]:.1f} |\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs (for a smoke test): results go to quick.md")
    ap.add_argument("--transports", default="worker", help="gateway transports for the governed gateway")
    ap.add_argument("--workers", default="1,2", help="`gateway serve --workers N` counts to compare ('' skips)")
    ap.add_argument("--litellm", type=Path, help="a virtualenv with litellm[proxy]: add LiteLLM's proxy as a column")
    ap.add_argument("--change", default="re-run", help="what changed since the last run (bench/results/history.md)")
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("taskset"):
        sys.exit("bench needs wrk and taskset: apt-get install -y wrk util-linux")
    load_before = os.getloadavg()
    n, seconds, rounds = (1000, 3.0, 1) if args.quick else (10_000, 10.0, 3)
    transports = [t for t in args.transports.split(",") if t]
    counts = [int(x) for x in args.workers.split(",") if x]

    stack = Stack()
    litellm = None
    try:
        direct = Target("direct", stack.sim_port, MODEL, pids=[stack.sim.pid])
        targets = [direct]
        ungov = stack.gateway("ungoverned")
        targets.append(Target("ungoverned", ungov.port, gateway=ungov, pids=[ungov.pid]))
        for transport in transports:
            gw = stack.gateway("governed", env={"GATEWAY_TRANSPORT": transport})
            name = "governed" if transport == "worker" else f"governed, `{transport}` transport"
            targets.append(Target(name, gw.port, key=stack.key, gateway=gw, pids=[gw.pid]))
        if args.litellm:
            target, litellm = litellm_target(args.litellm, stack.sim_port, stack.tmp)
            targets.append(target)

        for t in targets:  # warm up: connections, caches, the key lookup
            sequential(t.port, body(t.model, False), 200, False, t.key)
            sequential(t.port, body(t.model, True), 50, True, t.key)
        ours = [t for t in targets if not t.external]
        for stream in (False, True):
            clients = {t.name: Client(t.port, body(t.model, stream), stream, t.key) for t in ours}
            out = interleaved(clients, n)
            for t in ours:
                t.seq[stream] = out[t.name]
                clients[t.name].close()
            for t in targets[len(ours) :]:  # LiteLLM takes ~20 ms a request: a smaller sample of its own
                t.seq[stream] = sequential(t.port, body(t.model, stream), min(n, LITELLM_N), stream, t.key)

        r = redis.Redis(port=stack.redis.port)
        governed = next((t for t in targets if t.name == "governed"), None)
        adm = ""
        for t in targets:
            wrk(t.port, body(t.model, False), 1, key=t.key)  # warm up every connection
        for _ in range(rounds):
            for stream in (False, True):
                for t in targets:
                    if t is governed and not stream:
                        time.sleep(0.3)  # the previous run's batched writes land before counting
                        r.config_resetstat()
                    measured_load(t, stack, stream, seconds)
                    if t is governed and not stream:
                        time.sleep(0.3)
                        adm = (
                            "Redis commands per governed request (one concurrency-32 run): "
                            + redis_commands(r, t.load[False][-1][0].requests)
                            + " — one `evalsha` per request is admission (the only blocking round trip); "
                            "settlements and ledger writes go in pipelines after the response, key lookups are "
                            "cached for 1 s."
                        )
        r.close()
        if litellm is not None:
            stop(litellm)
            litellm = None
        for t in targets[1:]:
            if t.gateway is not None:
                t.gateway.stop()
                stack.gateways.remove(t.gateway)
        procs = workers_runs(stack, counts, seconds, rounds) if counts else []
        stall = loop_stall_ms(1_000_000)
    finally:
        if litellm is not None:
            stop(litellm)
        stack.close()
    loads = (load_before, os.getloadavg())
    command = "python -m bench.run " + " ".join(sys.argv[1:])
    text = report(targets, n, seconds, rounds, command.strip(), loads, adm, procs, stall, targets[-1].external)
    out = RESULTS / ("quick.md" if args.quick else "latest.md")
    out.write_text(text)
    if not args.quick:
        with (RESULTS / "history.md").open("a") as f:
            f.write(history_row(targets, args.change, load_before))
    print(text)


if __name__ == "__main__":
    main()
