"""The dispatch stage: send a request to a worker of the decided tier, retrying before the first byte.

Attempts are data (tenacity): at most ``retry.max_attempts`` attempts and ``retry.deadline_s``
seconds; each attempt takes the least-loaded worker of the current tier not yet tried, at most
``retry.attempts_per_tier`` per tier, then moves along the route's fallback tiers. A 5xx, a
connection failure or a time-out before the first byte is retried; a worker's 4xx is passed
through untouched. Once a byte has gone to the client nothing is retried.

For streams the first body chunk is read here, inside the attempt, so a worker that answers 200
and then dies before sending anything still counts as a failure that can be retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

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


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable and not isinstance(exc, NoHealthyWorker)


class Dispatcher:
    def __init__(
        self,
        client: httpx.AsyncClient,
        pool: WorkerPool,
        *,
        wait: wait_base | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.client = client
        self.pool = pool
        self.wait = wait or wait_none()
        self.sleep = sleep

    async def dispatch(
        self, policy: Policy, decision: RoutingDecision, parsed: ParsedRequest, request_id: str
    ) -> Upstream:
        plan = (decision.tier, *decision.fallbacks)
        tried: set[str] = set()
        per_tier: dict[str, int] = {}
        attempts = 0
        last_error: UpstreamError | None = None
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.retry.max_attempts) | stop_after_delay(policy.retry.deadline_s),
            retry=retry_if_exception(_retryable),
            wait=self.wait,
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                worker = self._next_worker(plan, tried, per_tier, policy.retry.attempts_per_tier)
                if worker is None:
                    if last_error is not None:
                        raise last_error
                    raise NoHealthyWorker(
                        f"No healthy worker for tier {decision.tier!r} or its fallbacks.",
                        headers={"retry-after": "1"},
                    )
                attempts += 1
                tried.add(worker.url)
                per_tier[worker.tier] = per_tier.get(worker.tier, 0) + 1
                try:
                    return await self._attempt(worker, policy.tiers[worker.tier].timeouts, parsed, request_id, attempts)
                except UpstreamError as exc:
                    last_error = exc
                    log.warning(
                        "attempt_failed",
                        worker=worker.url,
                        tier=worker.tier,
                        attempt=attempts,
                        error=exc.message,
                    )
                    raise
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    def _next_worker(
        self, plan: tuple[str, ...], tried: set[str], per_tier: dict[str, int], per_tier_limit: int
    ) -> Worker | None:
        for tier in plan:
            if per_tier.get(tier, 0) >= per_tier_limit:
                continue
            worker = self.pool.pick(tier, tried)
            if worker is not None:
                return worker
        return None

    async def _attempt(
        self, worker: Worker, timeouts: Timeouts, parsed: ParsedRequest, request_id: str, attempts: int
    ) -> Upstream:
        request = self.client.build_request(
            "POST",
            worker.url + parsed.endpoint.value,
            content=upstream_body(parsed, worker.model),
            headers={
                "content-type": "application/json",
                "accept-encoding": "identity",
                "x-request-id": request_id,
            },
            timeout=httpx.Timeout(timeouts.connect, read=None),
        )
        self.pool.acquire(worker)
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(timeouts.first_byte):
                response = await self.client.send(request, stream=True)
                if response.status_code >= 500:
                    detail = (await response.aread())[:200].decode(errors="replace")
                    raise WorkerUnavailable(f"Worker answered {response.status_code}: {detail}")
                if parsed.stream and response.status_code == 200:
                    chunks = response.aiter_raw()
                    first = await anext(chunks, b"")
                    if not first:
                        raise WorkerUnavailable("Worker closed the stream before sending anything.")
                    upstream = Upstream(self.pool, worker, attempts, response, None, chunks, first)
                else:
                    body = await response.aread()
                    upstream = Upstream(self.pool, worker, attempts, response, body, None, b"")
        except TimeoutError:
            await self._fail(worker, response)
            raise WorkerTimeout(
                f"Worker did not answer within {timeouts.first_byte:g}s (tier {worker.tier!r})."
            ) from None
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

    async def _fail(self, worker: Worker, response: httpx.Response | None) -> None:
        self.pool.release(worker)
        self.pool.report_failure(worker)
        if response is not None:
            await response.aclose()
