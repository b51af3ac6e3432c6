"""Worker profiles: how to launch vLLM for each tier.

A profile file sits beside the policy (``policies/local.yaml`` → ``policies/local.workers.yaml``)::

    version: 1
    tiers:
      small:
        model: .run/models/tiny-small       # a local path or a model id (meta-llama/Llama-3.1-8B-Instruct)
        tiny_model: small                   # build this tiny model at `model` when it is missing
        served_model_name: tiny-small       # the name the policy's tier uses
        max_model_len: 4096
        dtype: float32
        tensor_parallel_size: 1
        gpu_memory_utilization: 0.9         # GPU only; left out on CPU
        extra_args: [--max-num-seqs, "32"]
        env: {VLLM_CPU_KVCACHE_SPACE: "1"}
        startup_timeout_s: 600

Refused files get every problem as ``FILE:LINE: message``, like policies.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.policy.yamlread import ConfigError, PathKey, Problems, convert, convert_top, dotted, read

SUPPORTED_VERSIONS = (1,)


class ProfileError(ConfigError):
    """A worker profile file was refused; ``problems`` holds every ``FILE:LINE: message``."""


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str
    served_model_name: str | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    tiny_model: Literal["small", "frontier"] | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    startup_timeout_s: float = 600.0

    @property
    def name(self) -> str:
        """The model name clients (and the policy's tier) use."""
        return self.served_model_name or self.model

    def vllm_args(self, *, host: str, port: int) -> list[str]:
        """Arguments for ``python -m vllm.entrypoints.openai.api_server``."""
        args = ["--model", self.model, "--host", host, "--port", str(port), "--dtype", self.dtype]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return [*args, *self.extra_args]


class ProfileFile(msgspec.Struct, forbid_unknown_fields=True):
    """The top level; each tier's profile is decoded on its own, so every problem is reported."""

    version: int
    tiers: dict[str, Any] = {}


def _text(value: object) -> object:
    return str(value) if isinstance(value, int | float | Decimal) and not isinstance(value, bool) else value


_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def parse(text: str, source: str = "<workers>") -> dict[str, Profile]:
    try:
        data, problems = read(text, source, what="worker profile file")
    except ConfigError as exc:
        raise ProfileError(exc.problems) from None
    if not isinstance(data, dict):
        raise ProfileError([f"{source}:1: a worker profile file is a mapping with version and tiers"])
    top = convert_top(data, ProfileFile, problems, {"version": SUPPORTED_VERSIONS[0]})
    if top.version not in SUPPORTED_VERSIONS:
        problems.add(("version",), f"version: unsupported version {top.version!r} (supported: 1)")
    tiers = top.tiers
    if not tiers and isinstance(data.get("tiers", {}), dict):
        problems.add(("tiers",), "tiers: give at least one tier as a mapping of name to profile")
    profiles: dict[str, Profile] = {}
    for name, raw in tiers.items():
        path: PathKey = ("tiers", name)
        if isinstance(raw, dict):
            # YAML numbers in extra_args and env are meant as the strings a command line gets.
            if isinstance(args := raw.get("extra_args"), list):
                raw["extra_args"] = [_text(v) for v in args]
            if isinstance(env := raw.get("env"), dict):
                raw["env"] = {k: _text(v) for k, v in env.items()}
            for field in ("gpu_memory_utilization", "startup_timeout_s"):
                if field in raw and not isinstance(raw[field], bool | str | type(None)):
                    raw[field] = float(raw[field])
        profile = convert(raw, Profile, path, problems)
        if profile is None:
            continue
        _check(profile, path, problems)
        profiles[name] = profile
    if problems.items:
        raise ProfileError(problems.render())
    return profiles


def _check(p: Profile, path: PathKey, problems: Problems) -> None:
    def bad(field: str, message: str) -> None:
        problems.add((*path, field), f"{dotted((*path, field))}: {message}")

    if not p.model.strip():
        bad("model", "must not be empty")
    if p.served_model_name is not None and not p.served_model_name.strip():
        bad("served_model_name", "must not be empty")
    if p.max_model_len is not None and p.max_model_len < 16:
        bad("max_model_len", "must be at least 16")
    if p.dtype not in _DTYPES:
        bad("dtype", f"expected one of {', '.join(_DTYPES)}, got '{p.dtype}'")
    if p.tensor_parallel_size < 1:
        bad("tensor_parallel_size", "must be at least 1")
    if p.gpu_memory_utilization is not None and not 0 < p.gpu_memory_utilization <= 1:
        bad("gpu_memory_utilization", "must be greater than 0 and at most 1")
    if p.startup_timeout_s <= 0:
        bad("startup_timeout_s", "must be greater than 0")
    for i, arg in enumerate(p.extra_args):
        if arg in ("--model", "--port", "--host") or re.match(r"--(model|port|host)=", arg):
            problems.add((*path, "extra_args", i), f"{dotted((*path, 'extra_args', i))}: {arg} is set by the launcher")


def load(path: str | Path) -> dict[str, Profile]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError([f"{p}:1: cannot read worker profiles: {exc}"]) from None
    return parse(text, str(p))


def beside(policy: str | Path) -> Path:
    """The profile file that goes with a policy: ``NAME.yaml`` → ``NAME.workers.yaml``."""
    p = Path(policy)
    return p.with_name(f"{p.stem}.workers.yaml")
