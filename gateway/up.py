"""``gateway up``: the whole stack on one machine from one command.

With ``--sim`` it starts one simulator per worker URL of the policy (loopback addresses only),
then the gateway, waits until the gateway is ready, and prints the endpoint with copy-paste
examples, including the two shell-sourceable lines ``GATEWAY_URL=…`` and ``GATEWAY_API_KEY=…``.
Ctrl-C (or SIGTERM) stops the gateway first, then the workers, and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from gateway import store
from gateway.keys import KeyStore
from gateway.policy import PolicyError, load
from gateway.policy.schema import AuthMode
from gateway.settings import Settings

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> bool:
    start = time.monotonic()
    last_note = 0.0
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            print(f"  {what}: exited with code {proc.returncode}", file=sys.stderr)
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    print(f"  {what}: ready in {time.monotonic() - start:.1f}s", file=sys.stderr)
                    return True
        except (urllib.error.URLError, OSError):
            pass
        elapsed = time.monotonic() - start
        if elapsed - last_note >= 5:
            print(f"  {what}: starting… {elapsed:.0f}s", file=sys.stderr)
            last_note = elapsed
        time.sleep(0.1)
    print(f"  {what}: not ready after {timeout:.0f}s", file=sys.stderr)
    return False


async def _ping(url: str) -> bool:
    client = store.connect(url, timeout_s=0.5)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


def _ensure_redis(url: str) -> subprocess.Popen[bytes] | None:
    """Use the Redis at ``url`` if one answers; else start a local one there, persisted in .run/redis."""
    if asyncio.run(_ping(url)):
        print(f"using Redis at {url}", file=sys.stderr)
        return None
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
    )
    deadline = time.monotonic() + 10
    while not asyncio.run(_ping(url)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gateway up: redis-server did not start on port {port}")
        time.sleep(0.1)
    return proc


async def _create_key(url: str) -> str:
    client = store.connect(url, timeout_s=5)
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
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def up(*, policy: str, host: str, port: int, sim: bool) -> int:
    if not sim:
        print(
            "gateway up: real vLLM workers are not wired in yet; use `gateway up --sim` for simulator workers.",
            file=sys.stderr,
        )
        return 2
    try:
        pol = load(policy)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    settings = Settings.from_env()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_proc = _ensure_redis(settings.redis_url)
        if redis_proc is not None:
            procs.insert(0, ("redis", redis_proc))
        for tier in pol.tiers.values():
            for url in tier.workers:
                parts = urlsplit(url)
                if parts.hostname not in LOOPBACK or parts.port is None:
                    print(
                        f"  {tier.name} {url}: not a loopback address, assumed already running",
                        file=sys.stderr,
                    )
                    continue
                cmd = [sys.executable, "-m", "workers.sim", "--port", str(parts.port), "--model", tier.model]
                cmd += ["--max-model-len", str(tier.max_context or 8192)]
                proc = subprocess.Popen(cmd)
                procs.insert(0, (f"sim {tier.name} {url}", proc))
                print(f"starting simulator worker for tier {tier.name} at {url}", file=sys.stderr)
                if not _wait_http(f"{url}/health", proc, f"worker {tier.name} {url}"):
                    return 1
        gw = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--policy",
                policy,
                "--host",
                host,
                "--port",
                str(port),
            ]
        )
        procs.insert(0, ("gateway", gw))
        base = f"http://{host}:{port}"
        print(f"starting gateway at {base}", file=sys.stderr)
        if not _wait_http(f"{base}/readyz", gw, "gateway"):
            return 1
        key = asyncio.run(_create_key(settings.redis_url)) if pol.auth is AuthMode.API_KEY else "not-needed"
        print(
            f"\nThe gateway is up (policy {policy}, revision {pol.revision}).\n\n"
            f"GATEWAY_URL={base}\nGATEWAY_API_KEY={key}\n\n"
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
                    print(f"{name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping…", file=sys.stderr)
        return 0
    finally:
        _stop(procs)
