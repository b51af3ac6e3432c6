"""Helpers for the tests against real vLLM (CPU build, tiny models): a session's tiny models, and
a worker started by ``python -m workers launch``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import httpx

from tests.procs import ROOT, free_port, stop

# vLLM's pooling runner turns the tiny causal model into an embedding model (last-token pooling):
# /v1/embeddings, and /score and /rerank by the cosine of two embeddings.
POOLING_ARGS = ("--runner", "pooling", "--convert", "embed")


def profiles_yaml(models: Path, tiers: dict[str, str], *, pooling: Collection[str] = ()) -> str:
    """A worker profile file serving the session's tiny models: tier -> size. Tiers in ``pooling``
    run vLLM's pooling runner and are served as ``tiny-<tier>``; the others as ``tiny-<size>``."""
    out = "version: 1\ntiers:\n"
    for tier, size in tiers.items():
        out += (
            f"  {tier}:\n"
            f"    model: {models / size}\n"
            f"    tiny_model: {size}\n"
            f"    served_model_name: tiny-{tier if tier in pooling else size}\n"
            f"    max_model_len: {4096 if size == 'small' else 32768}\n"
            f"    dtype: float32\n"
            f"    env: {{VLLM_CPU_KVCACHE_SPACE: '1'}}\n"
            f"    startup_timeout_s: 900\n"  # about a minute on an idle machine; a shared one is slower
        )
        if tier in pooling:
            out += f"    extra_args: [{', '.join(POOLING_ARGS)}]\n"
    return out


class LaunchedWorker:
    """``python -m workers launch`` for one tier; ``wait`` returns once it is registered. ``python``
    is the interpreter that runs vLLM (a stand-in, for the fast tests); ``env`` adds to ours."""

    def __init__(
        self,
        profile: Path,
        tier: str,
        redis_url: str,
        log_dir: Path,
        *,
        ttl: float = 3.0,
        python: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"launch-{tier}-{self.port}.log"
        self.vllm_log = log_dir / f"vllm-{tier}-{self.port}.log"
        cmd = [sys.executable, "-m", "workers", "launch", "--profile", str(profile), "--tier", tier]
        cmd += ["--port", str(self.port), "--redis", redis_url, "--log-file", str(self.vllm_log)]
        cmd += ["--heartbeat-ttl", str(ttl), "--progress-s", "0.5"]
        if python is not None:
            cmd += ["--python", str(python)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while "registered in Redis" not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM not up after {timeout}s:\n{self.output()}")
            time.sleep(0.1)
        assert httpx.get(f"{self.url}/health", timeout=5).status_code == 200

    def stop(self) -> None:
        stop(self.proc, timeout=60)
