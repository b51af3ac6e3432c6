"""``Exchange``: what the gateway knows about one request as it moves through the stages.

It exists so that the things that must happen whatever goes wrong — releasing the worker,
settling admission, writing the ledger record and the request's log line — live in one place,
``finish``, called exactly once: from the handler's ``finally`` for plain responses, from the
relay's close for streams.

Billing rule: a request that reached a worker (``trace.reached``) gets exactly one ledger record,
however it ended — an answer, a worker error, a time-out, the client leaving, shutdown — with the
worker's usage when it came, else the prompt estimate and what was relayed. A request that never
reached a worker gets none, and its admission is given back whole (request count included).
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import TYPE_CHECKING

from gateway.admission import Admission, Admitter
from gateway.auth import Principal
from gateway.dispatch import Trace, Upstream
from gateway.errors import GatewayError
from gateway.facts import RequestFacts
from gateway.ledger import Ledger, LedgerRecord
from gateway.logging import RequestLog
from gateway.metrics import Recorder
from gateway.policy.decide import RoutingDecision
from gateway.policy.schema import Policy, Price, nano_of
from gateway.pool import Worker
from gateway.response_index import Holder, ResponseIndex
from gateway.schemas import Endpoint, UsageOnly
from gateway.streaming import Outcome, StreamRelay
from gateway.tokens import count_text

if TYPE_CHECKING:
    from gateway.shadow import Pending

ZERO = Decimal(0)

_STRUCTLOG = RequestLog()  # through structlog (tests that build an Exchange without the app's)


class Exchange:
    __slots__ = (
        "admission",
        "admitter",
        "arrived",
        "decision",
        "detached",
        "dispatched",
        "endpoint",
        "error",
        "facts",
        "finished",
        "ledger",
        "metrics",
        "outcome",
        "policy",
        "principal",
        "relay",
        "request_id",
        "request_log",
        "response_id",
        "responses",
        "shadow",
        "started",
        "status",
        "trace",
        "ttfb",
        "upstream",
        "usage",
    )

    def __init__(
        self,
        request_id: str,
        endpoint: Endpoint,
        policy: Policy,
        admitter: Admitter,
        metrics: Recorder,
        ledger: Ledger,
        responses: ResponseIndex | None = None,
        request_log: RequestLog | None = None,
    ):
        self.responses = responses
        self.request_log = request_log or _STRUCTLOG
        self.metrics = metrics
        self.ledger = ledger
        self.arrived = time.time()
        self.relay: StreamRelay | None = None
        self.dispatched: float | None = None  # when the worker was first called
        self.request_id = request_id
        self.response_id: str | None = None  # a Responses answer's id, remembered for GET/cancel
        self.endpoint = endpoint
        self.policy = policy
        self.admitter = admitter
        self.started = time.perf_counter()
        self.principal: Principal | None = None
        self.admission: Admission | None = None
        self.facts: RequestFacts | None = None
        self.decision: RoutingDecision | None = None
        self.upstream: Upstream | None = None
        self.usage: UsageOnly | None = None
        self.error: GatewayError | None = None
        self.status = 0
        self.outcome = Outcome.OK
        self.trace = Trace()  # filled in by dispatch: which worker the request reached
        self.ttfb: float | None = None
        self.detached = False  # a stream's relay owns finishing
        self.finished = False
        self.shadow: Pending | None = None  # a sampled shadow comparison (gateway/shadow.py)

    def headers(self) -> dict[str, str]:
        h = {"x-gateway-request-id": self.request_id}
        if self.decision is not None:
            h["x-gateway-route"] = self.decision.route
            h["x-gateway-tier"] = self.upstream.tier if self.upstream is not None else self.decision.tier
        if self.admission is not None:
            h.update(self.admission.headers)
        return h

    @property
    def worker(self) -> Worker | None:
        """The worker billed for this request: the one that answered, else the last one reached."""
        return self.upstream.worker if self.upstream is not None else self.trace.reached

    def used_tokens(self) -> int | None:
        """Tokens to settle the admission to: what the worker reported (or the estimate billed);
        0 when no worker produced anything; None (keep the reservation) when unknown."""
        if self.usage is not None:
            return self.usage.prompt_tokens + self.usage.completion_tokens
        if self.worker is None or self.status >= 400:
            return 0
        return None

    def used_spend(self, spent: Decimal | None = None) -> int | None:
        """Nano-dollars to settle a budget to, at the price of the tier that served; ``spent``: that
        cost, if the caller has worked it out already (``finish`` has, for the ledger)."""
        used = self.used_tokens()
        worker = self.worker
        if used is None:
            return None
        usage = self.usage
        if not used or worker is None or usage is None:
            return 0
        if spent is None:
            spent = self.price(worker.tier).cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        return nano_of(spent)

    def price(self, tier: str) -> Price:
        """What this request is billed at: the tier's price in effect when it arrived, with the
        endpoint's own input price where the tier has one (embeddings) as its input price."""
        price = self.policy.tiers[tier].price_at(self.arrived)
        price_in = price.input_for(self.endpoint.label)
        return price if price_in is price.input else Price(price_in, price.output, cached_input=price.cached_input)

    async def finish_stream(self, relay: StreamRelay) -> None:
        self.relay = relay
        self.usage = relay.usage
        self.response_id = relay.response_id
        if self.outcome is not Outcome.SHUTDOWN:
            self.outcome = relay.outcome
        if relay.usage is None and self.facts is not None:
            # no usage from the worker (it died, or the client left): bill what the client received
            self.usage = UsageOnly(self.facts.prompt_tokens, count_text(relay.relayed_text()))
        await self.finish()

    def first_byte(self) -> None:
        self.ttfb = time.perf_counter() - self.started

    def ledger_record(self, worker: Worker, spent: Decimal | None = None) -> LedgerRecord:
        """The record billed to ``worker``; ``spent``: its cost, if the caller has worked it out already."""
        price = self.price(worker.tier)  # billed at the price of its day
        usage, facts, decision, principal = self.usage, self.facts, self.decision, self.principal
        assert decision is not None
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        cached = usage.cached_tokens if usage else 0
        if spent is None:
            spent = price.cost(prompt, completion, cached)
        return LedgerRecord(
            request_id=self.request_id,
            time=self.arrived,
            tenant=principal.tenant if principal else "-",
            key_id=principal.key_id if principal else "-",
            route=decision.route,
            tier=worker.tier,
            model=worker.model,
            worker=worker.url,
            policy=decision.policy_revision,
            prompt_tokens=prompt,
            completion_tokens=completion,
            prompt_tokens_estimate=facts.prompt_tokens if facts else 0,
            price_input=str(price.input),
            price_output=str(price.output),
            cost_usd=str(spent),
            outcome=self.outcome.value,
            attempts=self.trace.attempts,
            ttfb_ms=round(self.ttfb * 1000, 3) if self.ttfb is not None else None,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            task=facts.task if facts else None,
            stream=facts.stream if facts else False,
            max_tokens=facts.max_tokens if facts else None,
            endpoint=self.endpoint.label,
            cached_tokens=cached,
            price_cached_input=str(price.cached_input) if price.cached_input is not None else "",
            model_alias=facts.model if facts else "",
            queue_wait_ms=round(self.trace.queue_wait * 1000, 3),
        )

    async def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        upstream = self.upstream
        if upstream is not None:
            await upstream.close()
        worker = self.worker
        if (
            self.usage is None
            and worker is not None
            and self.facts is not None
            and (self.outcome in _GAVE_UP or self.status == 200)
        ):
            # the worker's usage never came (or was not believable): bill the prompt it was sent
            self.usage = UsageOnly(self.facts.prompt_tokens, 0)
        facts, decision, usage = self.facts, self.decision, self.usage
        tier = worker.tier if worker else (decision.tier if decision else "-")
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        price = self.price(tier) if tier in self.policy.tiers else None
        # one cost for the ledger and the metrics (the ledger's tier is the worker's, as here)
        spent = price.cost(prompt, completion, usage.cached_tokens) if price and usage else ZERO
        if self.admission is not None:  # the budget is settled at the cost the ledger records
            used_spend = self.used_spend(spent if worker is not None else None)
            self.admitter.settle(self.admission, self.used_tokens(), used_spend, reached=worker is not None)
        if worker is not None and decision is not None:
            self.ledger.record(self.ledger_record(worker, spent if usage is not None and price is not None else None))
            if self.response_id is not None and self.responses is not None and self.principal is not None:
                self.responses.remember(self.response_id, Holder(self.principal.tenant, worker.tier, worker.url))
        if self.shadow is not None:  # the client's answer has gone out: the shadow runs on its own
            self.shadow.start(self)
        latency = time.perf_counter() - self.started
        self.metrics.request(
            tier=tier,
            route=decision.route if decision else "-",
            status=self.status,
            outcome=self.outcome.value,
            tenant=self.principal.tenant if self.principal else "-",
            input_tokens=prompt,
            output_tokens=completion,
            cost_usd=spent,
            latency_s=latency,
            ttfb_s=self.ttfb,
            overhead_s=self.dispatched - self.started if self.dispatched is not None else None,
            attempts=self.trace.attempts,
            decided_tier=decision.tier if decision else "-",
        )
        event = {
            "request_id": self.request_id,
            "endpoint": self.endpoint.label,
            "tenant": self.principal.tenant if self.principal else None,
            "key_id": self.principal.key_id if self.principal else None,
            "route": decision.route if decision else None,
            "tier": tier if tier != "-" else None,
            "policy": decision.policy_revision if decision else None,
            "worker": worker.url if worker else None,
            "prompt_tokens_estimate": facts.prompt_tokens if facts else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "cached_tokens": usage.cached_tokens if usage else None,
            "queue_wait_ms": round(self.trace.queue_wait * 1000, 2),
            "stream": facts.stream if facts else None,
            "status": self.status,
            "outcome": self.outcome.value,
            "attempts": self.trace.attempts,
            "ttfb_ms": round(self.ttfb * 1000, 2) if self.ttfb is not None else None,
            "latency_ms": round(latency * 1000, 2),
        }
        if self.error is not None:
            event["error"] = self.error.message
            self.request_log.write(_LEVELS.get(self.error.log_level, 20), event)
        else:
            self.request_log.write(20, event)
        span = self.trace.span
        if span is not None:
            span.finish(
                {
                    "gen_ai.request.model": facts.model if facts else None,
                    "gen_ai.response.model": worker.model if worker else None,
                    "gen_ai.request.max_tokens": facts.max_tokens if facts else None,
                    "gen_ai.usage.input_tokens": prompt if usage else None,
                    "gen_ai.usage.output_tokens": completion if usage else None,
                    "gen_ai.response.id": self.response_id,
                    "http.response.status_code": self.status,
                    "gateway.request_id": self.request_id,
                    "gateway.route": event["route"],
                    "gateway.tier": event["tier"],
                    "gateway.worker": event["worker"],
                    "gateway.tenant": event["tenant"],
                    "gateway.cost_usd": float(spent),
                    "gateway.outcome": self.outcome.value,
                    "gateway.attempts": self.trace.attempts,
                },
                self.error.message if self.error is not None else None,
            )


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_GAVE_UP = frozenset({Outcome.TIMEOUT, Outcome.CLIENT_DISCONNECT, Outcome.SHUTDOWN})
