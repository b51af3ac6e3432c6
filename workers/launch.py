"""``python -m workers launch --profile FILE --tier small --port 8101``: one real vLLM worker.

1. builds the profile's tiny model if it names one and it is missing;
2. starts ``python -m vllm.entrypoints.openai.api_server`` with the profile's arguments, in a
   process group of its own, its output going to a log file;
3. waits for ``/health``, printing progress (tier, port, elapsed time) instead of silence;
4. registers the worker in Redis (tier, URL, model, started) and keeps its heartbeat alive, so
   tiers with ``discover: redis`` use it; a worker whose heartbeat lapses leaves their pool;
5. on SIGTERM or Ctrl-C deregisters first (no new traffic), then stops vLLM cleanly;
6. if vLLM fails to start (or dies later), exits non-zero with vLLM's last log lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import faulthandler
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

import redis.exceptions

from gateway import registry, store
from gateway.settings import Settings
from workers import profile as profiles
from workers import tiny_model

# Local health checks never go through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
PR_SET_PDEATHSIG = 1
LAST_LINES = 40


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def last_lines(log: Path, n: int = LAST_LINES) -> list[str]:
    try:
        with log.open(errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=n)]
    except OSError:
        return []


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(f"{url}/health", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: vLLM gets SIGTERM if the launcher dies without stopping it (killed, crashed)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM vLLM's process group (the API server and its engine core), SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
    proc.wait()


class Launcher:
    def __init__(self, args: argparse.Namespace, profile: profiles.Profile):
        self.args = args
        self.profile = profile
        self.url = args.advertise or f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
        self.log = Path(args.log_file or f".run/logs/worker-{args.tier}-{args.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def prefix(self) -> str:
        return f"worker {self.args.tier} :{self.args.port}"

    def build_model(self) -> None:
        p = self.profile
        if p.tiny_model is None or tiny_model.is_built(Path(p.model)):
            return
        _say(f"{self.prefix()}: building tiny {p.tiny_model} model at {p.model} (random weights)")
        tiny_model.build(Path(p.model), p.tiny_model)

    def start(self) -> subprocess.Popen[bytes]:
        p = self.profile
        cmd = [self.args.python, "-m", VLLM_MODULE, *p.vllm_args(host=self.args.host, port=self.args.port)]
        env = {**os.environ, **p.env}
        if Path(p.model).exists():
            env.setdefault("HF_HUB_OFFLINE", "1")  # a local model: never reach for a hub
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        _say(f"{self.prefix()}: starting vLLM ({p.name}), log in {self.log}")
        return self.proc

    def fail(self, why: str) -> int:
        _say(f"{self.prefix()}: {why}; vLLM's last log lines ({self.log}):")
        for line in last_lines(self.log):
            _say(f"  | {line}")
        return 1

    async def wait_ready(self, stop: asyncio.Event) -> str | None:
        """None once /health answers 200; else why not."""
        assert self.proc is not None
        started = time.monotonic()
        last_note = 0.0
        while True:
            if self.proc.poll() is not None:
                return f"vLLM exited with code {self.proc.returncode} while starting"
            if await asyncio.to_thread(_healthy, self.url):
                _say(f"{self.prefix()}: ready in {time.monotonic() - started:.0f}s at {self.url}")
                return None
            elapsed = time.monotonic() - started
            if elapsed > self.profile.startup_timeout_s:
                return f"vLLM not healthy after {self.profile.startup_timeout_s:.0f}s"
            if self.args.progress_s > 0 and elapsed - last_note >= self.args.progress_s:
                _say(f"{self.prefix()}: starting… {elapsed:.0f}s")
                last_note = elapsed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if stop.is_set():
                return "stopped while starting"

    async def run(self) -> int:
        self.build_model()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        proc = self.start()
        beating: asyncio.Task[None] | None = None
        client = None
        try:
            why = await self.wait_ready(stop)
            if why == "stopped while starting":
                return 0
            if why is not None:
                return self.fail(why)
            if self.args.redis:
                client = store.connect(self.args.redis, timeout_s=2.0, mode=self.args.redis_mode)
                tier, ttl = self.args.tier, self.args.heartbeat_ttl
                reg = registry.Registration(url=self.url, model=self.profile.name, tier=tier, started=time.time())
                try:
                    await registry.beat(client, reg, ttl_s=ttl)  # registered before it says so
                    _say(f"{self.prefix()}: registered in Redis as {self.url} (tier {tier})")
                except (redis.exceptions.RedisError, OSError) as exc:
                    _say(f"{self.prefix()}: Redis at {self.args.redis} unreachable ({exc}); registering when it is")
                beating = asyncio.create_task(registry.heartbeat(client, reg, ttl_s=ttl, interval_s=ttl / 3))
            while not stop.is_set():
                if proc.poll() is not None:
                    return self.fail(f"vLLM exited with code {proc.returncode}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            _say(f"{self.prefix()}: stopping")
            return 0
        finally:
            try:
                if beating is not None:  # deregister before vLLM goes, so no new request is routed to it
                    beating.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beating
                if client is not None:
                    await client.aclose()
            finally:  # whatever went wrong above, vLLM does not outlive its launcher
                await asyncio.to_thread(_stop_group, proc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m workers launch", description="Start one vLLM worker for a tier.")
    ap.add_argument("--profile", required=True, help="worker profile file (e.g. policies/local.workers.yaml)")
    ap.add_argument("--tier", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--advertise", help="URL the gateway reaches this worker at (default http://HOST:PORT)")
    ap.add_argument(
        "--redis",
        default=Settings.from_env().redis_url,
        help="Redis to register in ($GATEWAY_REDIS_URL); '' to not register",
    )
    ap.add_argument(
        "--redis-mode",
        choices=["single", "cluster"],
        default=os.environ.get("GATEWAY_REDIS_MODE") or "single",
        help="cluster: --redis names any node of a Redis Cluster ($GATEWAY_REDIS_MODE)",
    )
    ap.add_argument("--heartbeat-ttl", type=float, default=5.0, help="seconds a missed heartbeat keeps the worker")
    ap.add_argument("--log-file", help="vLLM's output (default .run/logs/worker-TIER-PORT.log)")
    ap.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines; 0 for none")
    ap.add_argument("--python", default=sys.executable, help="the Python that has vLLM installed")
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a stuck launcher is
    try:
        table = profiles.load(args.profile)
    except profiles.ProfileError as exc:
        _say("\n".join(exc.problems))
        raise SystemExit(2) from None
    if args.tier not in table:
        _say(f"{args.profile}: no profile for tier {args.tier!r} (has: {', '.join(sorted(table))})")
        raise SystemExit(2)
    raise SystemExit(asyncio.run(Launcher(args, table[args.tier]).run()))


if __name__ == "__main__":
    main()
