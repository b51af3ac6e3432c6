"""``Exchange``: what the gateway knows about one request as it moves through the stages.

It exists so that the things that must happen whatever goes wrong — releasing the worker,
writing the request's log line (and, as those stages land, settling admission and writing the
ledger record) — live in one place, ``finish``, called exactly once: from the handler's
``finally`` for plain responses, from the relay's close for streams.
"""

from __future__ import annotations

import time

import structlog

from gateway.dispatch import Upstream
from gateway.errors import GatewayError
from gateway.facts import RequestFacts
from gateway.policy.decide import RoutingDecision
from gateway.schemas import Endpoint, UsageOnly

log = structlog.get_logger("gateway.request")


class Exchange:
    __slots__ = (
        "decision",
        "detached",
        "endpoint",
        "error",
        "facts",
        "finished",
        "outcome",
        "request_id",
        "started",
        "status",
        "ttfb",
        "upstream",
        "usage",
    )

    def __init__(self, request_id: str, endpoint: Endpoint):
        self.request_id = request_id
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.facts: RequestFacts | None = None
        self.decision: RoutingDecision | None = None
        self.upstream: Upstream | None = None
        self.usage: UsageOnly | None = None
        self.error: GatewayError | None = None
        self.status = 0
        self.outcome = "ok"
        self.ttfb: float | None = None
        self.detached = False  # a stream's relay owns finishing
        self.finished = False

    def headers(self) -> dict[str, str]:
        h = {"x-gateway-request-id": self.request_id}
        if self.decision is not None:
            h["x-gateway-route"] = self.decision.route
            h["x-gateway-tier"] = self.upstream.tier if self.upstream is not None else self.decision.tier
        return h

    def first_byte(self) -> None:
        self.ttfb = time.perf_counter() - self.started

    async def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        upstream = self.upstream
        if upstream is not None:
            await upstream.close()
        facts, decision, usage = self.facts, self.decision, self.usage
        event = {
            "request_id": self.request_id,
            "endpoint": self.endpoint.value,
            "tenant": facts.tenant if facts else None,
            "route": decision.route if decision else None,
            "tier": upstream.tier if upstream else (decision.tier if decision else None),
            "policy": decision.policy_revision if decision else None,
            "worker": upstream.worker.url if upstream else None,
            "prompt_tokens_estimate": facts.prompt_tokens if facts else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "stream": facts.stream if facts else None,
            "status": self.status,
            "outcome": self.outcome,
            "attempts": upstream.attempts if upstream else 0,
            "ttfb_ms": round(self.ttfb * 1000, 2) if self.ttfb is not None else None,
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 2),
        }
        if self.error is not None:
            event["error"] = self.error.message
            log.log(_LEVELS.get(self.error.log_level, 20), "request", **event)
        else:
            log.info("request", **event)


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
