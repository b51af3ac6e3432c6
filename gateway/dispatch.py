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
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_none,
)
from tenacity.wait import wait_base

from gateway.errors import NoHealthyWorker, UpstreamError, WorkerTimeout, WorkerUnavailable
from gateway.policy.decide import RoutingDecision
from gateway.policy.schema import Policy, Timeouts
from gateway.pool import Worker, WorkerPool
from gateway.schemas import ParsedRequest, upstream_body
from gateway.transport import SENT

log = structlog.get_logger("gateway.dispatch")


class Upstream:
    """An answer from a worker that nothing has yet been relayed of. ``close`` must be called once."""

    __slots__ = (
        "_released",
        "attempts",
        "body",
        "chunks",
        "first_chunk",
        "pool",
        "response",
        "tier",
        "worker",
    )

    def __init__(
        self,
        pool: WorkerPool,
        worker: Worker,
        attempts: int,
        response: httpx.Response,
        body: bytes | None,
        chunks: AsyncIterator[bytes] | None,
        first_chunk: bytes,
    ):
        self.pool = pool
        self.worker = worker
        self.tier = worker.tier
        self.attempts = attempts
        self.response = response
        self.body = body  # the whole body, unless this is an open stream
        self.chunks = chunks  # the rest of an open stream
        self.first_chunk = first_chunk
        self._released = False

    @property
    def status(self) -> int:
        return self.response.status_code

    async def close(self) -> None:
        if self._released:
            return
        self._released = True
        self.pool.release(self.worker)
        await self.response.aclose()


async def _read(response: httpx.Response) -> bytes:
    """The whole body, raw: the gateway asks for identity encoding and relays bytes as they are."""
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    parts = [chunk async for chunk in stream]
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _answer_problem(response: httpx.Response, stream: bool) -> str | None:
    """Why a worker's answer cannot be relayed (it is then a worker failure), or None. A 4xx is
    the client's error, relayed as the worker gave it."""
    status = response.status_code
    if 400 <= status < 500:
        return None
    if status != 200:
        # a 5xx; a 1xx or 3xx (a worker that redirects or answers an interim status is not
        # serving); any other 2xx (no body the endpoint promises)
        return f"Worker answered {status}"
    content_type = response.headers.get("content-type")
    if content_type is None:
        return None
    media = content_type.partition(";")[0].strip().lower()
    expected = _SSE if stream else _JSON
    if media != expected:
        return f"Worker answered 200 with content-type {content_type[:100]!r}, not {expected!r}"
    return None


_JSON = "application/json"
_SSE = "text/event-stream"


async def _start_of(response: httpx.Response) -> str:
    """The start of a failed answer's body, for the log: one read, never the whole (it may be
    long, or endless)."""
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    return (await anext(aiter(stream), b""))[:200].decode(errors="replace")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable  # the error tree says which (NoHealthyWorker: no)


class Trace:
    """What a request's dispatch did, readable whatever way it ended (an answer, an error, or
    cancellation): the last worker the request reached — the one the ledger bills — and how many
    attempts were made."""

    __slots__ = ("attempts", "reached")

    def __init__(self) -> None:
        self.reached: Worker | None = None
        self.attempts = 0


class _Run:
    """One request's walk over workers and tiers: what was tried, and the last failure."""

    __slots__ = (
        "attempts",
        "d",
        "decision",
        "headers",
        "last_error",
        "parsed",
        "per_tier",
        "plan",
        "policy",
        "request_id",
        "retry_timeouts",
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
    ):
        self.d = d
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

    async def attempt(self) -> Upstream:
        worker = self.d._next_worker(self.policy, self.plan, self.tried, self.per_tier, self.headers)
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
        try:
            timeouts = self.policy.tiers[worker.tier].timeouts
            return await self.d._attempt(worker, timeouts, self.parsed, self.request_id, self.attempts, self.trace)
        except UpstreamError as exc:
            self.last_error = exc
            log.warning("attempt_failed", worker=worker.url, tier=worker.tier, attempt=self.attempts, error=exc.message)
            raise


class Dispatcher:
    """Talks to workers only through ``transport`` — the one HTTP seam (tests substitute
    ``httpx.MockTransport``). The transport is called directly rather than through
    ``httpx.AsyncClient``: the client's cookie jar, auth and redirect layers cost about a sixth of
    the gateway's CPU per request in the benchmark and do nothing for worker traffic."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        pool: WorkerPool,
        *,
        wait: wait_base | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.transport = transport
        self.reports_sent = bool(getattr(transport, "reports_sent", False))
        self.pool = pool
        self._urls: dict[tuple[str, str], httpx.URL] = {}
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
    ) -> Upstream:
        """``headers``: the request's selected headers, for tiers with session affinity; ``trace``
        is filled in as attempts are made."""
        run = _Run(self, policy, decision, parsed, request_id, headers or {}, trace or Trace())
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

    def _next_worker(
        self,
        policy: Policy,
        plan: tuple[str, ...],
        tried: set[str],
        per_tier: dict[str, int],
        headers: Mapping[str, str],
    ) -> Worker | None:
        for tier in plan:
            if per_tier.get(tier, 0) >= policy.retry.attempts_per_tier:
                continue
            name = policy.tiers[tier].affinity_header
            worker = self.pool.pick(tier, tried, headers.get(name) if name else None)
            if worker is not None:
                return worker
        return None

    async def _attempt(
        self, worker: Worker, timeouts: Timeouts, parsed: ParsedRequest, request_id: str, attempts: int, trace: Trace
    ) -> Upstream:
        key = (worker.url, parsed.endpoint.value)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = httpx.URL(worker.url + parsed.endpoint.value)
        request = httpx.Request(
            "POST",
            url,
            content=upstream_body(parsed, worker.model),
            headers={"content-type": "application/json", "accept-encoding": "identity", "x-request-id": request_id},
            extensions={
                "timeout": {"connect": timeouts.connect, "read": None, "write": timeouts.connect, "pool": None}
            },
        )
        self.pool.acquire(worker)
        response: httpx.Response | None = None
        before = trace.reached
        if self.reports_sent:  # the transport says when the request is on the wire
            request.extensions[SENT] = lambda: setattr(trace, "reached", worker)
        else:  # from here on the worker may be generating
            trace.reached = worker
        try:
            async with asyncio.timeout(timeouts.first_byte):
                response = await self.transport.handle_async_request(request)
                problem = _answer_problem(response, parsed.stream)
                if problem is not None:  # never relayed to the client
                    raise WorkerUnavailable(f"{problem}: {await _start_of(response)}")
                if parsed.stream and response.status_code == 200:
                    assert isinstance(response.stream, httpx.AsyncByteStream)
                    chunks = aiter(response.stream)
                    first = await anext(chunks, b"")
                    if not first:
                        raise WorkerUnavailable("Worker closed the stream before sending anything.")
                    upstream = Upstream(self.pool, worker, attempts, response, None, chunks, first)
                else:
                    body = await _read(response)
                    upstream = Upstream(self.pool, worker, attempts, response, body, None, b"")
        except TimeoutError:
            # Leaving the `timeout` block closed the connection (the transport closes it when its
            # wait is cancelled; _fail closes a response already begun): the worker aborts.
            await self._fail(worker, response)
            raise WorkerTimeout(
                f"Worker did not answer within {timeouts.first_byte:g}s (tier {worker.tier!r})."
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            trace.reached = before  # never connected: this worker saw nothing
            await self._fail(worker, response)
            raise WorkerUnavailable(f"Worker unreachable: {exc or type(exc).__name__}.") from None
        except httpx.TimeoutException as exc:
            await self._fail(worker, response)
            raise WorkerTimeout(f"Worker timed out: {exc or type(exc).__name__}.") from None
        except (httpx.TransportError, OSError) as exc:
            await self._fail(worker, response)
            raise WorkerUnavailable(f"Worker unreachable: {exc or type(exc).__name__}.") from None
        except UpstreamError:
            await self._fail(worker, response)
            raise
        except BaseException:
            self.pool.release(worker)
            if response is not None:
                await response.aclose()
            raise
        self.pool.report_success(worker)
        return upstream

    async def forward(
        self, url: str, method: str, path: str, request_id: str, timeouts: Timeouts
    ) -> tuple[int, str, bytes]:
        """One request to one named worker (a stored response lives on one worker only): no retry,
        no other worker. Returns status, content type and body; a worker failure raises as dispatch's do."""
        request = httpx.Request(
            method,
            httpx.URL(url + path),
            headers={"accept-encoding": "identity", "x-request-id": request_id},
            extensions={
                "timeout": {"connect": timeouts.connect, "read": None, "write": timeouts.connect, "pool": None}
            },
        )
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(timeouts.first_byte):
                response = await self.transport.handle_async_request(request)
                body = await _read(response)
        except TimeoutError:
            raise WorkerTimeout(f"Worker did not answer within {timeouts.first_byte:g}s.") from None
        except (httpx.TransportError, OSError) as exc:
            raise WorkerUnavailable(f"Worker unreachable: {exc or type(exc).__name__}.") from None
        finally:
            if response is not None:
                await response.aclose()
        status = response.status_code
        if status >= 500 or status < 200 or 300 <= status < 400:
            raise WorkerUnavailable(f"Worker answered {status}: {body[:200].decode(errors='replace')}")
        return status, response.headers.get("content-type", "application/json"), body

    async def _fail(self, worker: Worker, response: httpx.Response | None) -> None:
        self.pool.release(worker)
        self.pool.report_failure(worker)
        if response is not None:
            await response.aclose()
