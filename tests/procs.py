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

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, redis: ClusterServer | None = None):
        self.tmp = tmp
        self.own_redis = redis is None
        self.redis: RedisServer | ClusterServer = RedisServer(tmp) if redis is None else redis
        self.small = Sim("tiny-small", tmp)
        self.frontier = Sim("tiny-frontier", tmp)
        self.env = {**self.redis.env, **(env or {})}
        self.gateways: list[Gateway] = []

    def start(self, policy: Path, replicas: int = 3) -> None:
        self.gateways = [Gateway(policy, self.tmp, self.env) for _ in range(replicas)]

    def stop(self) -> None:
        for g in self.gateways:
            g.stop()
        self.small.stop()
        self.frontier.stop()
        if self.own_redis:
            self.redis.stop()


def cluster_if_asked(request: Any) -> ClusterServer | None:
    """For a fixture parametrized "redis" or "cluster": the session's Redis Cluster, healthy and
    empty, when the test asked for it."""
    if request.param != "cluster":
        return None
    cluster: ClusterServer = request.getfixturevalue("redis_cluster_session")
    cluster.wait_ok()
    cluster.flush()
    return cluster


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
        self.env = {"GATEWAY_REDIS_URL": self.url}
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


def _cluster_port() -> int:
    """A free port P whose cluster bus port, P + 10000, is free too (and exists)."""
    import random

    while True:
        port = random.randint(20_000, 50_000)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


class ClusterServer:
    """A real Redis Cluster on loopback: ``primaries`` primaries with one replica each, made of
    ``redis-server --cluster-enabled yes`` processes on free ports and joined by
    ``redis-cli --cluster create``. ``url`` names one node; ``env`` is what a gateway or a CLI call
    needs to use it (``GATEWAY_REDIS_MODE=cluster``)."""

    def __init__(self, data_dir: Path, primaries: int = 3, node_timeout_ms: int = 1000):
        self.dir = data_dir
        self.node_timeout_ms = node_timeout_ms
        self.ports = [_cluster_port() for _ in range(2 * primaries)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for port in self.ports:
                self.start_node(port)
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.ports),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"
        self.env = {"GATEWAY_REDIS_MODE": "cluster", "GATEWAY_REDIS_URL": self.url}

    def start_node(self, port: int) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        node_dir = self.dir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_dir / "nodes.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--dir",
                str(node_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--enable-debug-command",
                "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._client(port, wait=True).close()

    def _client(self, port: int, wait: bool = False) -> Any:
        import redis

        client = redis.Redis(port=port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while wait:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {port} did not start") from None
                time.sleep(0.02)
        return client

    def command(self, port: int, *args: Any) -> Any:
        with self._client(port) as c:
            return c.execute_command(*args)

    def roles(self) -> dict[int, str]:
        """Each running node's role, ``master`` or ``slave``."""
        out = {}
        for port in self.procs:
            info = self.command(port, "ROLE")
            out[port] = info[0].decode()
        return out

    def primaries(self) -> list[int]:
        return sorted(p for p, role in self.roles().items() if role == "master")

    def wait_ok(self, within: float = 30.0) -> None:
        """Until every node says ``cluster_state:ok`` and sees every slot served, and every replica
        is in sync with its primary."""
        deadline = time.monotonic() + within
        while True:
            try:
                infos = [self.command(p, "CLUSTER", "INFO").decode() for p in self.procs]
                links = [self.command(p, "INFO", "replication") for p in self.procs]  # parsed by redis-py
                if all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos) and all(
                    r["role"] == "master" or r.get("master_link_status") == "up" for r in links
                ):
                    return
            except Exception:  # a node still starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def owner(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot."""
        any_node = next(iter(self.procs))
        slot = int(self.command(any_node, "CLUSTER", "KEYSLOT", key))
        for start, end, primary, *_ in self.command(any_node, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise LookupError(f"no primary serves {key!r}")

    def replica_of(self, primary: int) -> int:
        for port in self.procs:
            role = self.command(port, "ROLE")  # a replica: [b"slave", host, primary's port, state, offset]
            if role[0] == b"slave" and int(role[2]) == primary:
                return port
        raise LookupError(f"no replica of {primary}")

    def flush(self) -> None:
        for port in self.primaries():
            self.command(port, "FLUSHALL")
            self.command(port, "SCRIPT", "FLUSH")

    def kill(self, port: int) -> None:
        stop(self.procs.pop(port), signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs.values():
            stop(proc)
        self.procs.clear()
