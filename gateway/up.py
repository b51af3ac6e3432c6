"""``gateway up``: the whole stack on one machine from one command.

1. Redis: its own ``redis-server`` on a free loopback port, append-only, data in ``.run/redis`` —
   never someone else's by accident. Only a Redis named explicitly (``--redis URL`` or
   ``GATEWAY_REDIS_URL``) is used, with a clear notice that keys and the ledger land there; if a
   loopback one named so does not answer, it is started there;
2. workers: one per loopback worker URL of the policy (and one on a free port for a tier that only
   has ``discover: redis``) — real vLLM through ``python -m workers launch`` with the tier's worker
   profile (``NAME.workers.yaml`` beside the policy; tiny models are built on first use), or with
   ``--sim`` the simulator. They start together; progress (which worker, elapsed time) is printed
   while they do;
3. the gateway, its JSON log going to ``.run/gateway.log``; once it is ready, an API key, the
   endpoint, ``export GATEWAY_URL=… GATEWAY_API_KEY=… GATEWAY_REDIS_URL=…`` lines a shell can use
   (also written to ``--env-file``) and copy-paste examples. While it runs the terminal shows the
   gateway's warnings and errors and a one-line traffic summary (``gateway/up_log.py``).

Ctrl-C (or SIGTERM) stops the gateway first, then the workers (which deregister and stop vLLM),
then Redis, and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import NamedTuple
from urllib.parse import urlsplit

from gateway import store
from gateway.keys import KeyStore
from gateway.policy import PolicyError, load
from gateway.policy.schema import AuthMode, Policy
from gateway.settings import RedisMode, Settings, child_env
from gateway.up_log import LogFollower

# Local health checks never go through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


async def _ping(url: str, mode: RedisMode = "single") -> bool:
    client = store.connect(url, timeout_s=0.5, mode=mode)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


def _metrics_line(settings: Settings) -> str:
    if not settings.metrics_port:
        return ""
    return f"Metrics (Prometheus): http://{settings.metrics_host}:{settings.metrics_port}/metrics\n\n"


def _ensure_redis(url: str | None, mode: RedisMode = "single") -> tuple[subprocess.Popen[bytes] | None, str]:
    """The Redis to use and, if ``up`` started it, its process. ``url``: the one the user named, used
    if it answers (else started there when it is local; never a cluster: that one must be up
    already); None: start our own on a free port."""
    if url is None:
        url = f"redis://127.0.0.1:{_free_port()}/0"
    elif asyncio.run(_ping(url, mode)):
        print(
            f"using the Redis {'Cluster ' if mode == 'cluster' else ''}at {url}, which gateway up did not start: "
            "API keys, limits and the ledger are written there (unset GATEWAY_REDIS_URL to get a Redis of its "
            "own in .run/redis)",
            file=sys.stderr,
        )
        return None, url
    elif mode == "cluster":
        raise SystemExit(f"gateway up: no Redis Cluster node answers at {url} (GATEWAY_REDIS_MODE=cluster)")
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise SystemExit(f"gateway up: Redis at {url} does not answer, and it is not local to start")
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("gateway up: redis-server is not installed (apt-get install redis-server)")
    data = Path(".run/redis").resolve()
    data.mkdir(parents=True, exist_ok=True)
    port = str(parts.port or 6379)
    print(f"starting redis-server on port {port} (data in {data})", file=sys.stderr)
    proc = subprocess.Popen(
        [exe, "--port", port, "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", str(data), "--save", ""],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not asyncio.run(_ping(url)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gateway up: redis-server did not start on port {port}")
        time.sleep(0.1)
    return proc, url


async def _create_key(url: str, mode: RedisMode = "single") -> str:
    client = store.connect(url, timeout_s=5, mode=mode)
    try:
        _, secret = await KeyStore(client).create("local", "gateway up")
        return secret
    finally:
        await client.aclose()


def _stop(procs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for _name, proc in procs:  # gateway first (it was started last), then workers, then Redis
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)  # a vLLM launcher deregisters, then gives vLLM up to 30 s
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Planned(NamedTuple):
    tier: str
    url: str
    port: int
    register: bool  # the tier finds it through the registry (no static URL for it)


def _plan(pol: Policy) -> list[_Planned]:
    planned: list[_Planned] = []
    for tier in pol.tiers.values():
        local = 0
        for url in tier.workers:
            parts = urlsplit(url)
            if tier.discover_dns or parts.hostname not in LOOPBACK or parts.port is None:
                print(f"  {tier.name} {url}: not a loopback address, assumed already running", file=sys.stderr)
                continue
            planned.append(_Planned(tier.name, url, parts.port, False))
            local += 1
        if not local and tier.discover_redis:
            port = _free_port()
            planned.append(_Planned(tier.name, f"http://127.0.0.1:{port}", port, True))
    return planned


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(waiting: list[tuple[str, str, subprocess.Popen[bytes]]], what: str, timeout: float) -> bool:
    """Wait for every (name, URL, process) to answer 200 at its URL, together, printing which are
    ready every few seconds; False if a process exits or the time runs out."""
    begin = time.monotonic()
    ready: set[str] = set()
    last_note = 0.0
    while True:
        for name, url, proc in waiting:
            if name in ready:
                continue
            if proc.poll() is not None:
                print(f"  {name}: exited with code {proc.returncode}", file=sys.stderr)
                return False
            try:
                with _DIRECT.open(url, timeout=1) as r:
                    if r.status == 200:
                        ready.add(name)
                        print(f"  {name}: ready in {time.monotonic() - begin:.1f}s", file=sys.stderr)
            except (urllib.error.URLError, OSError):
                pass
        if len(ready) == len(waiting):
            return True
        elapsed = time.monotonic() - begin
        if elapsed > timeout:
            print(f"  {what} not ready after {timeout:.0f}s", file=sys.stderr)
            return False
        if elapsed - last_note >= 5:
            states = ", ".join(f"{name} {'ready' if name in ready else 'starting'}" for name, _, _ in waiting)
            print(f"  waiting for {what}… {elapsed:.0f}s ({states})", file=sys.stderr, flush=True)
            last_note = elapsed
        time.sleep(0.2)


def _exports(base: str, key: str, redis_url: str) -> str:
    return f"export GATEWAY_URL={base}\nexport GATEWAY_API_KEY={key}\nexport GATEWAY_REDIS_URL={redis_url}\n"


def up(
    *,
    policy: str | None,
    host: str,
    port: int,
    sim: bool,
    workers_file: str | None = None,
    redis_url: str | None = None,
    env_file: str | None = None,
) -> int:
    """``redis_url``: a Redis the user named (flag or ``GATEWAY_REDIS_URL``), else None."""
    policy = policy or ("policies/sim.yaml" if sim else "policies/local.yaml")
    try:
        pol = load(policy)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    profile_file = ""
    if not sim:
        from workers import profile as profiles  # the worker side; only the real stack needs it

        profile_file = workers_file or str(profiles.beside(policy))
        try:
            table = profiles.load(profile_file)
        except profiles.ProfileError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return 1
        missing = sorted(set(pol.tiers) - set(table))
        if missing:
            print(f"{profile_file}: no worker profile for tier(s) {', '.join(missing)}", file=sys.stderr)
            return 1
        startup_timeout = max(p.startup_timeout_s for p in table.values())
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    settings = Settings.from_env()
    planned = _plan(pol)
    taken = [w.port for w in planned if _port_taken(w.port)] + ([port] if _port_taken(port) else [])
    if taken:
        print(
            f"gateway up: port(s) {', '.join(map(str, taken))} already in use (is another `gateway up` running?)",
            file=sys.stderr,
        )
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)  # even where a shell started us with SIGINT ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)  # the terminal went away: stop everything as for Ctrl-C
    try:
        redis_proc, redis_url = _ensure_redis(redis_url, settings.redis_mode)
        if redis_proc is not None:
            procs.insert(0, ("redis", redis_proc))
        started: list[tuple[_Planned, subprocess.Popen[bytes]]] = []
        for w in planned:
            tier = pol.tiers[w.tier]
            if sim:
                cmd = [sys.executable, "-m", "workers.sim", "--port", str(w.port), "--model", tier.model]
                cmd += ["--max-model-len", str(tier.max_context or 8192)]
                if w.register:
                    cmd += ["--register", redis_url, "--tier", w.tier]
                print(f"starting simulator worker for tier {w.tier} at {w.url}", file=sys.stderr)
            else:
                cmd = [sys.executable, "-m", "workers", "launch", "--profile", profile_file, "--tier", w.tier]
                cmd += ["--port", str(w.port), "--redis", redis_url, "--progress-s", "0"]
                print(f"starting vLLM worker for tier {w.tier} at {w.url}", file=sys.stderr)
            proc = subprocess.Popen(cmd, start_new_session=True)
            procs.insert(0, (f"worker {w.tier} {w.url}", proc))
            started.append((w, proc))
        waiting = [(f"worker {w.tier} :{w.port}", f"{w.url}/health", proc) for w, proc in started]
        if not _wait_ready(waiting, "workers", timeout=30.0 if sim else startup_timeout):
            return 1
        log_path = Path(".run/gateway.log").resolve()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        follower = LogFollower(log_path, sys.stderr)
        with log_path.open("ab") as log_file:  # the child keeps its own descriptor
            gw = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--policy", policy, "--host", host, "--port", str(port)],
                start_new_session=True,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env(GATEWAY_REDIS_URL=redis_url, GATEWAY_LOG_FORMAT="json"),
            )
        procs.insert(0, ("gateway", gw))
        base = f"http://{host}:{port}"
        print(f"starting gateway at {base} (its log: {log_path})", file=sys.stderr)
        if not _wait_ready([("gateway", f"{base}/readyz", gw)], "the gateway", timeout=60.0):
            follower.poll()  # show why
            return 1
        key = asyncio.run(_create_key(redis_url, settings.redis_mode)) if pol.auth is AuthMode.API_KEY else "not-needed"
        kind = "simulator" if sim else "vLLM (tiny models: random weights, the text is noise)"
        exports = _exports(base, key, redis_url)
        if env_file:
            Path(env_file).write_text(exports)
            Path(env_file).chmod(0o600)  # it holds the API key
        print(
            f"\nThe gateway is up (policy {policy}, revision {pol.revision}; {kind} workers).\n\n"
            f"{exports}" + (f"(also in {env_file}: `source {env_file}`)\n" if env_file else "") + "\n"
            f"Requests are logged to {log_path}; this terminal shows problems and a traffic summary.\n\n"
            f"{_metrics_line(settings)}"
            f"Try it:\n"
            f"  curl -s {base}/v1/chat/completions -H 'authorization: Bearer {key}' "
            f"-H 'content-type: application/json' \\\n"
            f'    -d \'{{"model": "auto", "messages": [{{"role": "user", "content": "Hello"}}]}}\'\n\n'
            f"  python -c \"import openai; c = openai.OpenAI(base_url='{base}/v1', api_key='{key}'); "
            f"print(c.chat.completions.create(model='auto', messages=[{{'role': 'user', 'content': 'Hi'}}]))\"\n\n"
            f"Press Ctrl-C to stop.",
            flush=True,
        )
        while True:
            for name, proc in procs:
                if proc.poll() is not None:
                    follower.poll()
                    print(f"{name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            follower.poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping…", file=sys.stderr)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        _stop(procs)
