"""The dispatch stage: send a request to a worker of the decided tier, retrying before the first byte.

Attempts are data (tenacity): at most ``retry.max_attempts`` attempts and ``retry.deadline_s``
seconds; each attempt takes the least-loaded worker of the current tier not yet tried, at most
``retry.attempts_per_tier`` per tier, then moves along the route's fallback tiers. A 5xx, a
connection failure or a time-out before the first byte is retried; a worker's 4xx is passed
through untouched. Once a byte has gone to the client nothing is retried.

Only an answer the endpoint can give is relayed: besides a 5xx, a 1xx, a 3xx, a 2xx other than 200
(a 204 has no body to bill or relay) and a 200 whose content type is not the endpoint's (JSON, or
``text/event-stream`` for streams — an HTML page from a proxy in front of a worker, say) are
worker failures, retried like a 5xx. A 200 with no content type is taken at its word.

For streams the first body chunk is read here, inside the attempt, so a worker that answers 200
and then dies before sending anything still counts as a failure that can be retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import httpx
import msgspec
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_none,
)
from tenacity.wait import wait_base

from gateway import tracing
from gateway.auth import Principal
from gateway.errors import NoHealthyWorker, UpstreamError, WorkerTimeout, WorkerUnavailable
from gateway.flow import FlowControl
from gateway.placement import prefix_key
from gateway.policy.decide import RoutingDecision
from gateway.policy.schema import Placement, Policy, Priority, Tier, Timeouts
from gateway.pool import Worker, WorkerPool
from gateway.schemas import ParsedRequest, upstream_body
from gateway.transport import Answer, Header, WorkerClient, worker_client

log = structlog.get_logger("gateway.dispatch")


class Upstream:
    """An answer from a worker that nothing has yet been relayed of. ``close`` must be called once."""

    __slots__ = (
        "_released",
        "answer",
        "attempts",
        "body",
        "chunks",
        "first_chunk",
        "pool",
        "tier",
        "worker",
    )

    def __init__(
        self,
        pool: WorkerPool,
        worker: Worker,
        attempts: int,
        answer: Answer,
        body: bytes | None,
        chunks: AsyncIterator[bytes] | None,
        first_chunk: bytes,
    ):
        self.pool = pool
        self.worker = worker
        self.tier = worker.tier
        self.attempts = attempts
        self.answer = answer
        self.body = body  # the whole body, unless this is an open stream
        self.chunks = chunks  # the rest of an open stream
        self.first_chunk = first_chunk
        self._released = False

    @property
    def status(self) -> int:
        return self.answer.status

    @property
    def content_type(self) -> str | None:
        return self.answer.header("content-type")

    async def close(self) -> None:
        if self._released:
            return
        self._released = True
        self.pool.release(self.worker)
        await self.answer.aclose()


def _answer_problem(response: Answer, stream: bool) -> str | None:
    """Why a worker's answer cannot be relayed (it is then a worker failure), or None. A 4xx is
    the client's error, relayed as the worker gave it."""
    status = response.status
    if 400 <= status < 500:
        return None
    if status != 200:
        # a 5xx; a 1xx or 3xx (a worker that redirects or answers an interim status is not
        # serving); any other 2xx (no body the endpoint promises)
        return f"Worker answered {status}"
    content_type = response.header("content-type")
    if content_type is None:
        return None
    media = content_type.partition(";")[0].strip().lower()
    expected = _SSE if stream else _JSON
    if media != expected:
        return f"Worker answered 200 with content-type {content_type[:100]!r}, not {expected!r}"
    return None


_JSON = "application/json"
_SSE = "text/event-stream"


async def _start_of(response: Answer) -> str:
    """The start of a failed answer's body, for the log: one read, never the whole (it may be
    long, or endless)."""
    return (await anext(aiter(response), b""))[:200].decode(errors="replace")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable  # the error tree says which (NoHealthyWorker: no)


class Trace:
    """What a request's dispatch did, readable whatever way it ended (an answer, an error, or
    cancellation): the last worker the request reached — the one the ledger bills — how many
    attempts were made, how long it waited in saturated tiers' queues; and, when tracing is on,
    the request's span (attempts become its children)."""

    __slots__ = ("attempts", "queue_wait", "reached", "span")

    def __init__(self) -> None:
        self.reached: Worker | None = None
        self.attempts = 0
        self.queue_wait = 0.0  # seconds
        self.span: tracing.RequestSpan | None = None


class Caller(msgspec.Struct, frozen=True):
    """Who a request is for, as flow control sees it: the tenant it is queued under and its class."""

    tenant: str = "-"
    priority: Priority = Priority.INTERACTIVE


def caller_of(policy: Policy, principal: Principal | None, decision: RoutingDecision) -> Caller:
    """The queue a request waits in on a saturated tier: its tenant's, in its key's priority class
    (``fairness.key_priority``), else its route's, else interactive."""
    priority = policy.fairness.key_priority.get(principal.key_id) if principal is not None else None
    if priority is None:
        priority = decision.priority if decision.priority is not None else Priority.INTERACTIVE
    return Caller(principal.tenant if principal is not None else "-", priority)


class _Run:
    """One request's walk over workers and tiers: what was tried, and the last failure."""

    __slots__ = (
        "_caller",
        "attempts",
        "d",
        "decision",
        "headers",
        "last_error",
        "parsed",
        "per_tier",
        "plan",
        "policy",
        "prefix",
        "principal",
        "request_id",
        "retry_timeouts",
        "skipped",
        "trace",
        "tried",
    )

    def __init__(
        self,
        d: Dispatcher,
        policy: Policy,
        decision: RoutingDecision,
        parsed: ParsedRequest,
        request_id: str,
        headers: Mapping[str, str],
        trace: Trace,
        principal: Principal | None,
    ):
        self.d = d
        self.principal = principal
        self._caller: Caller | None = None  # only a queue or a priority-scheduling worker needs it
        self.prefix: bytes | bool | None = False  # computed when a prefix tier first needs it
        self.skipped: set[str] = set()  # tiers spilled past
        self.trace = trace
        self.headers = headers
        self.policy = policy
        self.decision = decision
        self.parsed = parsed
        self.request_id = request_id
        self.plan = (decision.tier, *decision.fallbacks)
        self.tried: set[str] = set()
        self.per_tier: dict[str, int] = {}
        self.attempts = 0
        self.last_error: UpstreamError | None = None
        self.retry_timeouts = policy.retry.retries_timeout(parsed.stream, parsed.max_tokens)

    def retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, WorkerTimeout) and not self.retry_timeouts:
            return False
        return _retryable(exc)

    def next_worker(self) -> Worker | str | None:
        """The next worker to try; a tier's name when that tier is saturated (wait for its queue)."""
        pool, flow = self.d.pool, self.d.flow
        for tier in self.plan:
            if self.per_tier.get(tier, 0) >= self.policy.retry.attempts_per_tier or tier in self.skipped:
                continue
            t = self.policy.tiers[tier]
            if t.gated and flow.must_wait(tier):
                return tier
            name = t.affinity_header
            worker = pool.pick(tier, self.tried, self.headers.get(name) if name else None, self.prefix_key(t))
            if worker is not None:
                return worker
        return None

    @property
    def caller(self) -> Caller:
        if self._caller is None:
            self._caller = caller_of(self.policy, self.principal, self.decision)
        return self._caller

    def prefix_key(self, tier: Tier) -> bytes | None:
        if tier.placement is not Placement.PREFIX:
            return None
        if self.prefix is False:
            self.prefix = prefix_key(self.parsed.texts)
        return self.prefix if isinstance(self.prefix, bytes) else None

    async def wait_for(self, tier: str) -> Worker | str | None:
        """Queue for a saturated tier; then its worker, or the next choice if the request spilled."""
        t = self.policy.tiers[tier]
        spill = self.decision.spill_after_ms if tier != self.plan[-1] else None
        granted, waited = await self.d.flow.enter(
            t,
            self.caller.tenant,
            self.policy.fairness.weight(self.caller.tenant),
            self.caller.priority,
            spill / 1000 if spill is not None else None,
        )
        self.trace.queue_wait += waited
        if granted:
            name = t.affinity_header
            worker = self.d.pool.pick(tier, self.tried, self.headers.get(name) if name else None, self.prefix_key(t))
            if worker is not None:
                return worker
        else:
            log.info("spilled", tier=tier, waited_ms=round(waited * 1000, 1))
        self.skipped.add(tier)
        return self.next_worker()

    async def attempt(self) -> Upstream:
        worker = self.next_worker()
        while isinstance(worker, str):
            worker = await self.wait_for(worker)
        if worker is None:
            if self.last_error is not None:
                raise self.last_error
            raise NoHealthyWorker(
                f"No healthy worker for tier {self.decision.tier!r} or its fallbacks.", headers={"retry-after": "1"}
            )
        self.attempts += 1
        self.trace.attempts = self.attempts
        self.tried.add(worker.url)
        self.per_tier[worker.tier] = self.per_tier.get(worker.tier, 0) + 1
        tier = self.policy.tiers[worker.tier]
        priority = self.caller.priority if tier.engine_priority else None
        span = self.trace.span
        child = None
        context: dict[str, str] = {}
        if span is not None:
            child, context = span.attempt(worker.url, worker.tier, self.attempts)
        try:
            upstream = await self.d._attempt(
                worker, tier.timeouts, self.parsed, self.request_id, self.attempts, self.trace, context, priority
            )
        except UpstreamError as exc:
            self.last_error = exc
            log.warning(
                "attempt_failed",
                request_id=self.request_id,
                worker=worker.url,
                tier=worker.tier,
                attempt=self.attempts,
                error=exc.message,
            )
            if child is not None:
                tracing.RequestSpan.attempt_done(child, None, exc.message)
            raise
        except BaseException:
            if child is not None:
                tracing.RequestSpan.attempt_done(child, None, "cancelled")
            raise
        if child is not None:
            tracing.RequestSpan.attempt_done(child, upstream.status)
        return upstream


class Dispatcher:
    """Talks to workers only through ``transport`` — the one HTTP seam (tests substitute
    ``httpx.MockTransport``). The gateway's own ``WorkerTransport`` is called with plain values
    (no httpx objects per request); any other httpx transport through ``HttpxWorkerClient``.
    Never through ``httpx.AsyncClient``: its cookie jar, auth and redirect layers cost about a
    sixth of the gateway's CPU per request in the benchmark and do nothing for worker traffic."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        pool: WorkerPool,
        *,
        flow: FlowControl | None = None,
        wait: wait_base | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.client: WorkerClient = worker_client(transport)
        self.pool = pool
        self.flow = flow or FlowControl(pool)
        self.wait = wait or wait_none()
        self.sleep = sleep

    async def dispatch(
        self,
        policy: Policy,
        decision: RoutingDecision,
        parsed: ParsedRequest,
        request_id: str,
        headers: Mapping[str, str] | None = None,
        trace: Trace | None = None,
        principal: Principal | None = None,
    ) -> Upstream:
        """``headers``: the request's selected headers, for tiers with session affinity; ``trace``
        is filled in as attempts are made; ``principal``: whose queue turn a saturated tier gives it."""
        run = _Run(self, policy, decision, parsed, request_id, headers or {}, trace or Trace(), principal)
        started = time.monotonic()
        # The first attempt runs outside tenacity: its per-call bookkeeping cost about a tenth of the
        # gateway's CPU in the benchmark, and most requests never retry. Retries are tenacity's.
        try:
            return await run.attempt()
        except UpstreamError as exc:
            if not run.retryable(exc):
                raise
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.retry.max_attempts - 1)
            | stop_after_delay(max(policy.retry.deadline_s - (time.monotonic() - started), 0.0)),
            retry=retry_if_exception(run.retryable),
            wait=self.wait,
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await run.attempt()
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    async def once(
        self, worker: Worker, timeouts: Timeouts, parsed: ParsedRequest, request_id: str, trace: Trace
    ) -> Upstream:
        """One attempt on one worker, never retried (shadow calls, ``gateway/shadow.py``)."""
        trace.attempts = 1
        return await self._attempt(worker, timeouts, parsed, request_id, 1, trace, {})

    async def _attempt(
        self,
        worker: Worker,
        timeouts: Timeouts,
        parsed: ParsedRequest,
        request_id: str,
        attempts: int,
        trace: Trace,
        context: Mapping[str, str],
        priority: Priority | None = None,
    ) -> Upstream:
        """``context``: the trace context headers (``traceparent``) for the worker, when tracing is on."""
        headers: list[Header] = [*_POST_HEADERS, (b"x-request-id", request_id.encode())]
        if context:
            headers += [(k.encode(), v.encode()) for k, v in context.items()]
        body = upstream_body(parsed, worker.model, priority)
        self.pool.acquire(worker)
        answer: Answer | None = None
        before = trace.reached
        on_sent = None
        if self.client.reports_sent:  # the transport says when the request is on the wire

            def on_sent() -> None:
                trace.reached = worker

        else:  # from here on the worker may be generating
            trace.reached = worker
        try:
            async with asyncio.timeout(timeouts.first_byte):
                answer = await self.client.send(
                    "POST", worker.url, parsed.endpoint.value, headers, body, timeouts.connect, on_sent
                )
                problem = _answer_problem(answer, parsed.stream)
                if problem is not None:  # never relayed to the client
                    raise WorkerUnavailable(f"{problem}: {await _start_of(answer)}")
                if parsed.stream and answer.status == 200:
                    chunks = aiter(answer)
                    first = await anext(chunks, b"")
                    if not first:
                        raise WorkerUnavailable("Worker closed the stream before sending anything.")
                    upstream = Upstream(self.pool, worker, attempts, answer, None, chunks, first)
                else:
                    upstream = Upstream(self.pool, worker, attempts, answer, await answer.read(), None, b"")
        except TimeoutError:
            # Leaving the `timeout` block closed the connection (the transport closes it when its
            # wait is cancelled; _fail closes an answer already begun): the worker aborts.
            await self._fail(worker, answer)
            raise WorkerTimeout(
                f"Worker did not answer within {timeouts.first_byte:g}s (tier {worker.tier!r})."
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            trace.reached = before  # never connected: this worker saw nothing
            await self._fail(worker, answer)
            raise WorkerUnavailable(f"Worker unreachable: {exc or type(exc).__name__}.") from None
        except httpx.TimeoutException as exc:
            await self._fail(worker, answer)
            raise WorkerTimeout(f"Worker timed out: {exc or type(exc).__name__}.") from None
        except (httpx.TransportError, OSError) as exc:
            await self._fail(worker, answer)
            raise WorkerUnavailable(f"Worker unreachable: {exc or type(exc).__name__}.") from None
        except UpstreamError:
            await self._fail(worker, answer)
            raise
        except BaseException:
            self.pool.release(worker)
            if answer is not None:
                await answer.aclose()
            raise
        self.pool.report_success(worker)
        return upstream

    async def forward(
        self, url: str, method: str, path: str, request_id: str, timeouts: Timeouts
    ) -> tuple[int, str, bytes]:
        """One request to one named worker (a stored response lives on one worker only): no retry,
        no other worker. Returns status, content type and body; a worker failure raises as dispatch's do."""
        headers: list[Header] = [(b"accept-encoding", b"identity"), (b"x-request-id", request_id.encode())]
        answer: Answer | None = None
        try:
            async with asyncio.timeout(timeouts.first_byte):
                answer = await self.client.send(method, url, path, headers, b"", timeouts.connect)
                body = await answer.read()
        except TimeoutError:
            raise WorkerTimeout(f"Worker did not answer within {timeouts.first_byte:g}s.") from None
        except (httpx.TransportError, OSError) as exc:
            raise WorkerUnavailable(f"Worker unreachable: {exc or type(exc).__name__}.") from None
        finally:
            if answer is not None:
                await answer.aclose()
        status = answer.status
        if status >= 500 or status < 200 or 300 <= status < 400:
            raise WorkerUnavailable(f"Worker answered {status}: {body[:200].decode(errors='replace')}")
        return status, answer.header("content-type") or "application/json", body

    async def _fail(self, worker: Worker, answer: Answer | None) -> None:
        self.pool.release(worker)
        self.pool.report_failure(worker)
        if answer is not None:
            await answer.aclose()


_POST_HEADERS: tuple[Header, ...] = ((b"content-type", b"application/json"), (b"accept-encoding", b"identity"))
