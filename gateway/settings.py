"""Typed settings from ``GATEWAY_*`` environment variables; the only reader of ``os.environ``.

Command-line flags override these: the CLI builds a ``Settings`` with ``from_env(**overrides)``,
and for multi-process serving hands the result to the child processes with ``as_env()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

LogFormat = Literal["auto", "json", "console"]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Transport = Literal["worker", "aiohttp", "httpx"]
RedisMode = Literal["single", "cluster"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    policy: str = "policies/sim.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    redis_url: str = "redis://127.0.0.1:6379/0"
    # cluster: GATEWAY_REDIS_URL names any node of a Redis Cluster (gateway/cluster.py, README "Redis Cluster")
    redis_mode: RedisMode = "single"
    admin_token: str | None = None
    max_body_bytes: int = 1024 * 1024
    log_format: LogFormat = "auto"
    log_level: str = "info"
    transport: Transport = "worker"
    # Prompts longer than this many characters are tokenized on a thread so the event loop keeps moving.
    tokenize_inline_chars: int = 16_384
    watch: bool = False  # reload the policy file when it changes
    # a ledger batch is written once this many replicas have it too (WAIT); else it is also spooled.
    # 0: the primary's answer is enough (a failover can lose its last records). Redis Cluster: 1.
    ledger_wait_replicas: Annotated[int, msgspec.Meta(ge=0)] = 0
    spool_dir: str = ".run/spool"  # ledger records wait here while Redis is away (keep it on a volume)
    shutdown_grace_s: float = 30.0  # on SIGTERM: stop accepting, let requests in flight finish this long
    health_interval_s: float = 2.0
    registry_interval_s: float = 1.0  # look up workers registered in Redis (discover: redis) this often
    load_scrape_interval_s: float = 1.0  # read each worker's /metrics for its load this often; 0: never
    redis_timeout_s: float = 0.25
    reservation_ttl_s: float = 5.0  # concurrency slots live this long, renewed while their request runs
    key_cache_ttl_s: float = 1.0  # a revoked key stops working on every replica within this
    # how long GET /v1/responses/{id} and its cancel can be routed back to the worker that made it
    response_ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 24 * 3600
    # prometheus-client's own variable (not GATEWAY_*): set by `gateway serve --workers N`
    metrics_dir: str | None = None
    max_connections_per_worker: int = 256
    # The serving port's edge (gateway/edge.py): what one client may make the gateway hold.
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024  # request line + headers; 431 above
    max_headers: Annotated[int, msgspec.Meta(ge=1)] = 100  # 431 above
    head_timeout_s: Positive = 10.0  # from connecting (or the first byte of the next request) to the end of the head
    body_timeout_s: Positive = 30.0  # from the end of the head to the end of the body
    keepalive_s: Positive = 5.0  # an idle keep-alive connection is closed after this
    # Prometheus metrics have their own listener (gateway/metrics_listener.py), never the serving port.
    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 9464  # 0: no metrics listener
    metrics_token: str | None = None  # if set, scrapes need `Authorization: Bearer <token>`
    # Requests in flight in this process (streams until their relay closes) above which new ones get
    # 503 `overloaded` at once; measured with `python -m bench.faults` (bench/results/faults.md).
    max_in_flight: int = 200
    overload_retry_after_s: int = 1  # the Retry-After of that 503
    # OpenTelemetry traces (gateway/tracing.py): on when the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    # or OTEL_EXPORTER_OTLP_ENDPOINT is set (and OTEL_SDK_DISABLED is not true); the SDK reads the rest.
    otel_endpoint: str | None = None
    # The ledger archive (gateway/archive/): reports, exports and the admin API read it beside Redis, and
    # the gateway archives days before today into it every ledger_archive_interval_s, off the request path.
    ledger_archive_url: str | None = None  # postgresql://...
    ledger_archive_interval_s: Positive = 300.0
    author: str | None = None  # who `gateway policy apply` records as the author (default: the OS user)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for field in cls.__struct_fields__:
            value = env.get(f"GATEWAY_{field.upper()}")
            if value is not None and value != "":
                raw[field] = value
        if env.get("PROMETHEUS_MULTIPROC_DIR"):
            raw["metrics_dir"] = env["PROMETHEUS_MULTIPROC_DIR"]
        # the full URL spans are posted to, as the OTLP/HTTP exporter derives it
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        otlp = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (base.rstrip("/") + "/v1/traces" if base else "")
        if otlp and env.get("OTEL_SDK_DISABLED", "").lower() != "true" and env.get("OTEL_TRACES_EXPORTER") != "none":
            raw["otel_endpoint"] = otlp
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid setting: {exc}") from None

    def as_env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for field in self.__struct_fields__:
            value = getattr(self, field)
            if value is not None:
                out[f"GATEWAY_{field.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def named(field: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of ``GATEWAY_<FIELD>`` if the environment sets it (not the default)."""
    env = os.environ if environ is None else environ
    return env.get(f"GATEWAY_{field.upper()}") or None


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``extra`` on top, for a child process."""
    return {**os.environ, **extra}
