"""Real processes on free loopback ports for tests: simulator workers and the gateway itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port free now. Another process may take it before ours binds it: the starters below
    (``Sim``, ``Gateway``) then start again on new ports (``PORT_TRIES``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT_TRIES = 3


def _in_use(log: Path) -> bool:
    return "address already in use" in log.read_text(errors="replace").lower()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _started(proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    """Wait for a process to answer; one that does not in time is stopped, not left running."""
    try:
        wait_http(url, proc, timeout)
    except BaseException:
        stop(proc)
        raise


class Sim:
    def __init__(self, model: str, log_dir: Path, *args: str):
        self.model = model
        for attempt in range(PORT_TRIES):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log = log_dir / f"sim-{self.port}.log"
            cmd = [sys.executable, "-m", "workers.sim", "--port", str(self.port), "--model", model, *args]
            with self.log.open("wb") as out:
                self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                _started(self.proc, f"{self.url}/health", 60.0)
                return
            except RuntimeError:
                if attempt == PORT_TRIES - 1 or not _in_use(self.log):
                    raise

    def faults(self, **faults: Any) -> None:
        httpx.post(f"{self.url}/sim/faults", json=faults, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/sim/stats", timeout=5).json()
        return data

    def stop(self) -> None:
        stop(self.proc)


class Gateway:
    def __init__(
        self, policy: Path, log_dir: Path, env: dict[str, str] | None = None, *args: str, start_timeout: float = 60.0
    ):
        for attempt in range(PORT_TRIES):
            try:
                self._start(policy, log_dir, env, start_timeout, *args)
                return
            except RuntimeError:
                if attempt == PORT_TRIES - 1 or not _in_use(self.log):
                    raise

    def _start(self, policy: Path, log_dir: Path, env: dict[str, str] | None, start_timeout: float, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"  # the metrics listener
        self.log = log_dir / f"gateway-{self.port}.log"
        full_env = {
            **os.environ,
            "GATEWAY_LOG_FORMAT": "json",
            "GATEWAY_HEALTH_INTERVAL_S": "0.5",
            # never the machine's shared Redis: tests that need one pass their own redis-server's URL
            "GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0",
            "GATEWAY_SPOOL_DIR": str(log_dir / f"spool-{self.port}"),
            "GATEWAY_METRICS_PORT": str(self.metrics_port),
            **(env or {}),
        }
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(self.port), *args]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
        _started(self.proc, f"{self.url}/healthz", start_timeout)

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def stop(self) -> None:
        stop(self.proc)


class Replicas:
    """One redis-server, a small-tier and a frontier-tier simulator, and gateway replicas sharing
    them (``start``); ``env`` is what every gateway and CLI call gets."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.small = Sim("tiny-small", tmp)
        self.frontier = Sim("tiny-frontier", tmp)
        self.env = {"GATEWAY_REDIS_URL": self.redis.url, **(env or {})}
        self.gateways: list[Gateway] = []

    def start(self, policy: Path, replicas: int = 3) -> None:
        self.gateways = [Gateway(policy, self.tmp, self.env) for _ in range(replicas)]

    def stop(self) -> None:
        for g in self.gateways:
            g.stop()
        self.small.stop()
        self.frontier.stop()
        self.redis.stop()


def two_tier_policy(small: list[str], frontier: list[str], extra: str = "") -> str:
    def workers(urls: list[str]) -> str:
        return "".join(f"      - url: {u}\n" for u in urls) if urls else "      []\n"

    return f"""version: 1
auth: none
tiers:
  small:
    model: tiny-small
    workers:
{workers(small)}    price: {{input: 0.10, output: 0.40}}
    max_context: 4096
    timeouts: {{connect: 1, first_byte: 2, idle: 1}}
  frontier:
    model: tiny-frontier
    workers:
{workers(frontier)}    price: {{input: 3.00, output: 15.00}}
    timeouts: {{connect: 1, first_byte: 2, idle: 1}}
routes:
  - name: classify
    match:
      task: [classification, categorization]
    tier: small
    fallback: [frontier]
  - name: small-alias
    match:
      model: [small]
    tier: small
    fallback: [frontier]
  - name: default
    tier: frontier
{extra}"""


class RedisServer:
    """A real redis-server on a free port, which tests may stop and start again on the same port."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        persist: bool = False,
        core: int | None = None,
        fsync: str = "always",
        debug: bool = False,
    ):
        self.core = core  # benchmarks pin it to a CPU core
        self.debug = debug  # allow DEBUG SLEEP (a stalled Redis) from loopback
        self.fsync = fsync
        self.persist = persist  # append-only file, so that data survives a restart as in production
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not installed: run `make test` (it installs it) or apt-get install redis-server"
            )
        pin = ["taskset", "-c", str(self.core)] if self.core is not None else []
        self.proc = subprocess.Popen(
            [
                *pin,
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persist else "no",
                "--appendfsync",
                self.fsync,
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
                *(["--enable-debug-command", "local"] if self.debug else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def gateway_cli(env: dict[str, str], *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the `gateway` command as a user would, with ``env`` (GATEWAY_* settings) only."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=check,
    )


@contextlib.contextmanager
def admin_stack(tmp: Path, extra_policy: str = "", admin_token: str = "admin-secret") -> Iterator[Gateway]:
    """A redis-server, a small and a frontier simulator and a gateway with an admin token
    (``two_tier_policy`` + ``extra_policy``); whatever started is stopped, even if a later start fails."""
    with contextlib.ExitStack() as started:
        redis = RedisServer(tmp)
        started.callback(redis.stop)
        small = Sim("tiny-small", tmp)
        started.callback(small.stop)
        frontier = Sim("tiny-frontier", tmp)
        started.callback(frontier.stop)
        policy = tmp / "policy.yaml"
        policy.write_text(two_tier_policy([small.url], [frontier.url], extra_policy))
        gw = Gateway(policy, tmp, {"GATEWAY_REDIS_URL": redis.url, "GATEWAY_ADMIN_TOKEN": admin_token})
        started.callback(gw.stop)
        yield gw
