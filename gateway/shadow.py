"""Shadow comparisons: a sample of a route's requests is also sent to another tier, off the
client's path, and the two answers are compared (``gateway/compare.py``).

A route with ``shadow: {tier, sample}`` gets one check on the hot path (``decision.shadow is not
None``); a route without costs nothing more. A sampled request keeps its parsed body
(``Pending``); once the client's answer has gone out, ``Exchange.finish`` hands the exchange to
``Pending.start``, which starts a background task — the client never waits for it.

The shadow call is sent once (never retried), non-streaming, to the least-loaded worker of the
shadow tier, at most ``max_in_flight`` per route and process at a time; when that many are in
flight, or the shadow tier has no available worker, the sample is dropped (counted per day in
``ledger.drops_key``), never queued. A shadow to the tier that answered the client
(a split route's other side) is not sent: there is nothing to compare.

Every shadow call that reached a worker is billed in the ledger like any call, with outcome
``shadow`` and tenant ``(platform)`` — its cost is the platform's, not the tenant's — and carries
the comparison: the client's request id and tier, the measure, the score, and whether they agreed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import time
from collections import Counter
from typing import TYPE_CHECKING

import msgspec
import redis.asyncio as aioredis
import structlog

from gateway.compare import Comparison, compare
from gateway.dispatch import Dispatcher, Trace, Upstream
from gateway.errors import UpstreamError, WorkerTimeout
from gateway.ledger import SHADOW_OUTCOME, SHADOW_TENANT, Ledger, LedgerRecord, drops_key
from gateway.policy.schema import Shadow
from gateway.pool import Worker
from gateway.schemas import Endpoint, ParsedRequest, UsageOnly, read_answer
from gateway.store import Client
from gateway.streaming import StreamRelay

if TYPE_CHECKING:
    from gateway.exchange import Exchange

log = structlog.get_logger("gateway.shadow")
COMPARABLE = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})
_answer = msgspec.json.Decoder()


def answer_text(endpoint: Endpoint, body: bytes) -> str | None:
    """The generated text of a whole chat or completions answer (first choice), or None."""
    try:
        data = _answer.decode(body)
        choice = data["choices"][0]
        text = choice["message"]["content"] if endpoint is Endpoint.CHAT else choice["text"]
    except (msgspec.DecodeError, KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


class Pending:
    """A sampled request, waiting for its client's answer to go out."""

    __slots__ = ("body", "parsed", "primary_tier", "relay", "shadow", "shadower", "target")

    def __init__(self, shadower: Shadower, shadow: Shadow, parsed: ParsedRequest):
        self.shadower = shadower
        self.shadow = shadow
        self.parsed = parsed
        # filled in when the client's answer has gone out: what it was, and where the copy goes
        self.primary_tier = ""
        self.target: Worker | None = None
        self.relay: StreamRelay | None = None
        self.body: bytes | None = None

    def start(self, ex: Exchange) -> None:
        self.shadower.start(self, ex)


class Shadower:
    def __init__(self, dispatcher: Dispatcher, ledger: Ledger, redis: Client | None, *, rng: random.Random):
        self.dispatcher = dispatcher
        self.ledger = ledger
        self.redis = redis
        self.rng = rng
        self.in_flight: Counter[str] = Counter()  # per route
        self.tasks: set[asyncio.Task[None]] = set()
        self.dropped: Counter[tuple[str, str]] = Counter()  # (day, "task|route|tier|reason") not yet written

    def sample(self, shadow: Shadow, parsed: ParsedRequest) -> Pending | None:
        if parsed.endpoint not in COMPARABLE or self.rng.random() >= shadow.sample:
            return None
        return Pending(self, shadow, parsed)

    def start(self, pending: Pending, ex: Exchange) -> None:
        worker, decision = ex.worker, ex.decision
        if worker is None or decision is None or ex.status != 200 or ex.outcome.value != "ok":
            return  # the client got no answer to compare with
        shadow = pending.shadow
        if worker.tier == shadow.tier:
            return  # the client's answer came from the shadow tier itself
        task = ex.facts.task if ex.facts is not None else None
        if self.in_flight[decision.route] >= shadow.max_in_flight:
            self._drop(ex.arrived, task, decision.route, shadow.tier, "busy")
            return
        target = self.dispatcher.pool.pick(shadow.tier)
        if target is None:
            self._drop(ex.arrived, task, decision.route, shadow.tier, "no_worker")
            return
        pending.primary_tier, pending.target = worker.tier, target
        pending.relay, pending.body = ex.relay, ex.upstream.body if ex.upstream is not None else None
        self.in_flight[decision.route] += 1
        job = asyncio.get_running_loop().create_task(self._run(pending, ex))
        self.tasks.add(job)
        job.add_done_callback(self.tasks.discard)

    def _drop(self, when: float, task: str | None, route: str, tier: str, reason: str) -> None:
        day = datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d")
        self.dropped[(day, f"{task or ''}|{route}|{tier}|{reason}")] += 1

    async def _run(self, pending: Pending, ex: Exchange) -> None:
        assert ex.decision is not None
        route = ex.decision.route
        try:
            await self._call(pending, ex)
        except Exception as exc:  # a shadow must never disturb anything else
            log.warning("shadow_failed", request_id=ex.request_id, error=repr(exc))
        finally:
            self.in_flight[route] -= 1

    async def _call(self, pending: Pending, ex: Exchange) -> None:
        shadow, parsed, target, primary_tier = pending.shadow, pending.parsed, pending.target, pending.primary_tier
        assert target is not None
        policy = ex.policy
        copy = msgspec.structs.replace(parsed, stream=False, client_wants_usage=False)
        if parsed.stream:
            copy = msgspec.structs.replace(
                copy, body={k: v for k, v in parsed.body.items() if k not in ("stream", "stream_options")}
            )
        trace = Trace()
        started = time.perf_counter()
        upstream: Upstream | None = None
        usage: UsageOnly | None = None
        answer: str | None = None
        status = 0
        try:
            timeouts = policy.tiers[shadow.tier].timeouts
            upstream = await self.dispatcher.once(target, timeouts, copy, f"{ex.request_id}.shadow", trace)
            status = upstream.status
            if status == 200 and upstream.body is not None:
                usage, _ = read_answer(copy.endpoint, upstream.body)
                answer = answer_text(copy.endpoint, upstream.body)
        except WorkerTimeout:
            status = 0  # it reached the worker and was abandoned: billed its prompt below
        except UpstreamError:
            status = -1
        except asyncio.CancelledError:
            if trace.reached is not None:
                self._record(ex, trace, primary_tier, None, None, started, gave_up=True)
            raise
        finally:
            if upstream is not None:
                await upstream.close()
        if trace.reached is None:
            return  # never reached a worker: nothing to bill
        comparison: Comparison | None = None
        if answer is not None:
            relay = pending.relay
            primary = relay.relayed_text() if relay is not None else answer_text(ex.endpoint, pending.body or b"")
            if primary is not None:
                comparison = await asyncio.to_thread(compare, primary, answer, shadow.compare, shadow.threshold)
        self._record(ex, trace, primary_tier, usage, comparison, started, gave_up=status == 0)

    def _record(
        self,
        ex: Exchange,
        trace: Trace,
        primary_tier: str,
        usage: UsageOnly | None,
        c: Comparison | None,
        started: float,
        *,
        gave_up: bool,
    ) -> None:
        worker = trace.reached
        assert worker is not None and ex.decision is not None
        facts = ex.facts
        if usage is None:  # no usage: a time-out bills the prompt the worker was sent, an error nothing
            usage = UsageOnly(facts.prompt_tokens if facts is not None and gave_up else 0, 0)
        price = ex.price(worker.tier)
        self.ledger.record(
            LedgerRecord(
                request_id=f"{ex.request_id}.shadow",
                time=ex.arrived,
                tenant=SHADOW_TENANT,
                key_id="-",
                route=ex.decision.route,
                tier=worker.tier,
                model=worker.model,
                worker=worker.url,
                policy=ex.decision.policy_revision,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                prompt_tokens_estimate=facts.prompt_tokens if facts else 0,
                price_input=str(price.input),
                price_output=str(price.output),
                cost_usd=str(price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)),
                outcome=SHADOW_OUTCOME,
                attempts=trace.attempts,
                ttfb_ms=None,
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
                task=facts.task if facts else None,
                stream=False,
                max_tokens=facts.max_tokens if facts else None,
                endpoint=ex.endpoint.label,
                cached_tokens=usage.cached_tokens,
                price_cached_input=str(price.cached_input) if price.cached_input is not None else "",
                model_alias=facts.model if facts else "",
                shadow_of=ex.request_id,
                primary_tier=primary_tier,
                comparator=c.measure if c else "",
                score=round(c.score, 4) if c else None,
                agree=c.agree if c else None,
            )
        )

    async def flush_drops(self) -> None:
        if not self.dropped or self.redis is None:
            return
        batch, self.dropped = self.dropped, Counter()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (day, field), n in batch.items():
                    pipe.hincrby(drops_key(day), field, n)
                await pipe.execute()
        except (OSError, TimeoutError, aioredis.RedisError):
            self.dropped.update(batch)  # counted again next time

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush_drops()

    async def stop(self) -> None:
        """At shutdown: cancel shadow calls in flight (each bills what reached a worker), then write drops."""
        for job in list(self.tasks):
            job.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        with contextlib.suppress(Exception):
            await self.flush_drops()
