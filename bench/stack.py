"""The processes a benchmark runs against, and what the kernel says they cost.

``Stack`` starts one simulator worker and one redis-server on core 1 (the load generator's core)
and creates an API key in that Redis; ``Stack.gateway(config)`` starts a gateway in one of two
configurations:

- ``governed`` — what a real deployment runs: ``auth: api_key`` with a real key, a tenant limit
  with requests and tokens per minute and a per-key requests-per-minute limit (all far above the
  load, so nothing is refused), the ledger writing every request's record to Redis, metrics
  recorded per request, one JSON log line per request written to a file;
- ``ungoverned`` — ``auth: none`` and no limits (ledger, metrics and the JSON log line stay on).

The gateway is pinned with ``taskset`` (core 0 by default). CPU time and RSS come from
``/proc/PID/stat`` and ``/proc/PID/status``, summed over a process and its children (a gateway
started with ``--workers N`` is a supervisor and N children).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import RedisServer, free_port, stop, wait_http

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
TICK = os.sysconf("SC_CLK_TCK")

# Far above any load this machine can make: admission runs (one Redis round trip, three counters)
# but never refuses.
LIMITS = "limits:\n  - {scope: tenant, rpm: 100000000, tpm: 10000000000}\n  - {scope: key, rpm: 100000000}\n"
CONFIGS = {
    "ungoverned": "auth: none\n",
    "governed": "auth: api_key\n" + LIMITS,
}


def policy_text(sim_port: int, config: str) -> str:
    return (
        "version: 1\ntiers:\n  t:\n    model: bench-model\n"
        f"    workers: [{{url: 'http://127.0.0.1:{sim_port}'}}]\n    price: {{input: 1, output: 2}}\n"
        "routes:\n  - {name: default, tier: t}\n" + CONFIGS[config]
    )


def start(
    cmd: list[str], cores: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``cmd`` pinned to ``cores`` (taskset execs it: the pid is the command's own)."""
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            ["taskset", "-c", cores, *cmd],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (scanning /proc: works without CONFIG_PROC_CHILDREN)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def family(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent running processes since boot (user, nice, system: not interrupts,
    whose time no process is charged with, nor steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[0] + fields[1] + fields[2]) / TICK


@dataclass
class GatewayProc:
    config: str
    port: int
    proc: subprocess.Popen[bytes]
    key: str | None
    log: Path
    workers: int = 1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The serving processes: the process itself, or with ``--workers N`` its N children
        (uvicorn's supervisor only watches them) — multiprocessing's helpers excluded."""
        kids = [p for p in children(self.pid) if "multiprocessing.resource_tracker" not in cmdline(p)]
        return kids if self.workers > 1 else [self.pid]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in family(self.pid))

    def stop(self) -> None:
        stop(self.proc)


@dataclass
class Stack:
    """A simulator worker and a redis-server on ``side_core``, and an API key in that Redis."""

    side_core: int = 1
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-")))

    def __post_init__(self) -> None:
        self.sim_port = free_port()
        self.sim = start(
            [sys.executable, "-m", "workers.sim", "--port", str(self.sim_port), "--model", MODEL],
            str(self.side_core),
        )
        self.redis = RedisServer(self.tmp, core=self.side_core)
        self.gateways: list[GatewayProc] = []
        try:
            wait_http(f"http://127.0.0.1:{self.sim_port}/health", self.sim)
            self.key = asyncio.run(self._make_key())
        except BaseException:
            self.close()
            raise

    async def _make_key(self) -> str:
        from gateway import store
        from gateway.keys import KeyStore

        client = store.connect(self.redis.url, timeout_s=2)
        _, secret = await KeyStore(client).create("bench", "bench")
        await client.aclose()
        return secret

    def gateway(
        self, config: str, cores: str = "0", workers: int = 1, env: dict[str, str] | None = None
    ) -> GatewayProc:
        """A gateway in ``config`` (``governed`` | ``ungoverned``), ready to serve."""
        port = free_port()
        name = f"{config}-{port}"
        policy = self.tmp / f"{name}.yaml"
        policy.write_text(policy_text(self.sim_port, config))
        log = self.tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(port)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        full_env = {
            "GATEWAY_REDIS_URL": self.redis.url,
            "GATEWAY_LOG_FORMAT": "json",
            "GATEWAY_SPOOL_DIR": str(self.tmp / f"spool-{port}"),
            # several gateways at once: no metrics listeners (metrics are still recorded per request)
            "GATEWAY_METRICS_PORT": "0",
            **(env or {}),
        }
        proc = start(cmd, cores, full_env, log)
        gw = GatewayProc(config, port, proc, self.key if config == "governed" else None, log, workers)
        self.gateways.append(gw)
        wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        return gw

    def side_cpu(self) -> float:
        """CPU seconds of the simulator and Redis (they share the load generator's core)."""
        return cpu_seconds(self.sim.pid) + (cpu_seconds(self.redis.proc.pid) if self.redis.proc else 0.0)

    def close(self) -> None:
        for gw in self.gateways:
            gw.stop()
        stop(self.sim)
        self.redis.stop()
