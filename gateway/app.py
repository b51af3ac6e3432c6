"""``create_app(settings)``: the Litestar application. Its lifespan wires the HTTP client, the worker
pool, the dispatcher and the policy; nothing else happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import redis.exceptions
import structlog
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from gateway import admin, api, openapi, probes, store, tokens, tracing, uptime
from gateway import logging as gateway_logging
from gateway.admission import Admitter
from gateway.auth import Authenticator
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError, for_status, render, render_anthropic
from gateway.keys import KeyStore
from gateway.ledger import Ledger
from gateway.metrics_listener import MetricsListener
from gateway.policy import load
from gateway.policy.live import PolicyFollower, startup_policy, watch_file
from gateway.policy.schema import AuthMode
from gateway.policy.store import PolicyStore
from gateway.pool import WorkerPool
from gateway.registry import leases
from gateway.respond import Plain
from gateway.response_index import ResponseIndex
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.transport import WorkerTransport

log = structlog.get_logger("gateway.app")


def make_transport(settings: Settings) -> httpx.AsyncBaseTransport:
    """The one HTTP transport to workers: the gateway's own by default; aiohttp's and httpx's for
    comparison (``GATEWAY_TRANSPORT``) — bench/results/latest.md has the numbers behind the choice."""
    if settings.transport == "worker":
        return WorkerTransport(max_idle_per_worker=settings.max_connections_per_worker)
    if settings.transport == "aiohttp":
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=settings.max_connections_per_worker, keepalive_timeout=30
            )
            return aiohttp.ClientSession(connector=connector, auto_decompress=False)

        transport: httpx.AsyncBaseTransport = AiohttpTransport(client=session)
        return transport
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=30)
    return httpx.AsyncHTTPTransport(limits=limits)


REQUEST_ID = "x-gateway-request-id"


def _request_id(app: Litestar) -> dict[str, str]:
    runtime = getattr(app.state, "runtime", None)  # None only before the lifespan has started
    return {REQUEST_ID: runtime.next_request_id()} if runtime is not None else {}


def gateway_error_handler(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    """The one rendering of a ``GatewayError`` a handler raised: OpenAI's shape, or Anthropic's on
    ``/v1/messages*`` (its SDK reads its own)."""
    anthropic = request.url.path.startswith("/v1/messages")
    return Response(
        content=exc.anthropic_body() if anthropic else exc.body(),
        status_code=exc.status,
        media_type="application/json",
        headers={**exc.headers, **_request_id(request.app)},
    )


def http_exception_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (no route, wrong method, body too large) answered as the error tree's."""
    status = exc.status_code
    error = for_status(status, str(exc.detail), dict(exc.headers or {}))
    if error is not None:
        return gateway_error_handler(request, error)
    anthropic = request.url.path.startswith("/v1/messages")
    error_type = "invalid_request_error" if status < 500 else "api_error"
    return Response(
        content=render_anthropic(str(exc.detail), status) if anthropic else render(str(exc.detail), error_type),
        status_code=status,
        media_type="application/json",
        headers={**(exc.headers or {}), **_request_id(request.app)},
    )


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled_error", path=request.url.path)
    return Response(
        content=render("The gateway failed to handle the request.", "api_error", None, "internal_error"),
        status_code=500,
        media_type="application/json",
        headers=_request_id(request.app),
    )


# Shutdown (after uvicorn's GATEWAY_SHUTDOWN_GRACE_S): how long each step may take at most. A
# normal shutdown takes milliseconds; the bounds exist for a Redis or a task that does not answer.
DRAIN_S = 1.5  # requests cancelled at the end of the grace period run their finish (ledger, settle)
STOP_TASKS_S = 1.0
FLUSH_S = 1.0
LEDGER_FLUSH_S = 2.0  # its writes time out on their own after GATEWAY_REDIS_TIMEOUT_S and spool


async def _drain(runtime: Runtime, timeout_s: float) -> None:
    """Wait until no request is in flight: uvicorn cancels what outlives the grace period just
    before the lifespan ends, and those requests' ``finish`` (ledger record, settlement) must be
    queued before the last flushes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while runtime.in_flight and loop.time() < deadline:  # noqa: ASYNC110 - polled once, at shutdown, not per request
        await asyncio.sleep(0.01)
    if runtime.in_flight:
        log.warning("shutdown_requests_still_running", in_flight=runtime.in_flight)


async def stop_tasks(tasks: list[asyncio.Task[Any]], timeout_s: float) -> None:
    """Cancel ``tasks`` and wait for them, at most ``timeout_s``. A task that swallowed its
    cancellation (a library turning it into a time-out it then retried) is cancelled again; one that
    still runs at the deadline is named in the log and left behind — the process is exiting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = set(tasks)
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=min(0.1, max(0.0, deadline - loop.time())))
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("background_task_failed", task=_name(task), error=repr(task.exception()))
    if pending:
        log.error("background_tasks_not_stopped", tasks=sorted(map(_name, pending)))


def _name(task: asyncio.Task[Any]) -> str:
    return str(getattr(task.get_coro(), "__qualname__", task.get_name()))


async def _bounded(step: str, awaitable: Awaitable[Any], timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await awaitable
    except TimeoutError:
        log.error("shutdown_step_timed_out", step=step, timeout_s=timeout_s)
    except Exception as exc:  # one step failing must not skip the next ones
        log.error("shutdown_step_failed", step=step, error=repr(exc))


def _gpu_workers(runtime: Runtime, pool: WorkerPool) -> Callable[[], list[tuple[str, str]]]:
    """(tier, URL) of the workers of tiers priced per GPU-hour that pass their health checks now."""

    def up() -> list[tuple[str, str]]:
        priced = {name for name, tier in runtime.policy.tiers.items() if tier.gpu_hour is not None}
        return [(tier, url) for tier, url, available, _ in pool.states() if available and tier in priced]

    return up


def create_app(settings: Settings) -> Litestar:
    request_log = gateway_logging.configure(settings.log_format, settings.log_level)
    policy = load(settings.policy)
    tokens.encoding()  # load the encoder once, before the first request

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # first, so that a metrics port already taken stops the start before anything else runs
        metrics = None
        if settings.metrics_port:
            metrics = MetricsListener(
                settings.metrics_host,
                settings.metrics_port,
                token=settings.metrics_token,
                multiprocess_dir=settings.metrics_dir,
                reuse_port=settings.workers > 1,  # every process listens; any one answers for all
            )
            await metrics.start()
        transport = make_transport(settings)
        client = httpx.AsyncClient(transport=transport, timeout=None)  # health checks share the connections
        pool = WorkerPool()
        pool.sync(policy)
        redis_client = store.connect(settings.redis_url, settings.redis_timeout_s, settings.redis_mode)
        resp = store.pipelined(settings.redis_url, settings.redis_timeout_s, settings.redis_mode)
        admitter = Admitter(resp, timeout_s=settings.redis_timeout_s, reservation_ttl_s=settings.reservation_ttl_s)
        auth = Authenticator(KeyStore(redis_client), cache_ttl_s=settings.key_cache_ttl_s)
        policies = PolicyStore(redis_client)
        serving = await startup_policy(policy, policies)
        pool.sync(serving)
        # waiting for replicas holds the connection: the ledger gets one of its own then
        ledger_conn = (
            store.pipelined(settings.redis_url, settings.redis_timeout_s, settings.redis_mode)
            if settings.ledger_wait_replicas
            else resp
        )
        ledger = Ledger(
            ledger_conn,
            settings.spool_dir,
            wait_replicas=settings.ledger_wait_replicas,
            wait_ms=int(settings.redis_timeout_s * 1000 / 2),
        )
        responses = ResponseIndex(resp, settings.response_ttl_s)
        dispatcher = Dispatcher(transport, pool)
        runtime = Runtime(
            settings, serving, pool, dispatcher, auth, admitter, redis_client, ledger, responses, request_log
        )
        app.state.runtime = runtime

        def listener() -> Any:
            return store.subscriber(redis_client, settings.redis_url, settings.redis_timeout_s)

        background = [
            asyncio.create_task(PolicyFollower(lambda: runtime.policy, runtime.swap_policy, policies, listener).run()),
            asyncio.create_task(auth.run_last_used()),
            asyncio.create_task(ledger.run()),
            asyncio.create_task(responses.run()),
            asyncio.create_task(runtime.follow_budgets()),
            asyncio.create_task(admitter.run_renewals()),
            asyncio.create_task(runtime.shadows.run()),
        ]
        if settings.watch:
            background.append(
                asyncio.create_task(watch_file(lambda: runtime.policy, runtime.swap_policy, settings.policy))
            )
        if settings.ledger_archive_url:
            from gateway.archive import sink  # psycopg only where there is an archive

            background.append(asyncio.create_task(sink.run(settings)))
        background.append(
            asyncio.create_task(uptime.follow(redis_client, _gpu_workers(runtime, pool), settings.health_interval_s))
        )
        if policy.auth is AuthMode.NONE:
            log.warning(
                "AUTH_DISABLED",
                message="the policy sets `auth: none`: API keys are NOT checked and the x-gateway-tenant header "
                "is trusted. Use this for local development only.",
            )
        settler = asyncio.create_task(admitter.run_settler())

        async def registered(tier: str) -> dict[str, float]:
            try:
                return await leases(redis_client, tier)
            except redis.exceptions.RedisError as exc:
                raise OSError(str(exc)) from exc

        await probes.discover(pool, probes.system_resolver)
        await probes.discover_registered(pool, registered)
        await probes.check_once(pool, client, probe_timeout=1.0)
        health = asyncio.create_task(
            probes.run_health_checks(pool, client, settings.health_interval_s, runtime.metrics.workers)
        )
        background.append(asyncio.create_task(probes.run_registry(pool, registered, settings.registry_interval_s)))
        if settings.load_scrape_interval_s > 0:
            background.append(
                asyncio.create_task(probes.run_load_scrapes(pool, client, settings.load_scrape_interval_s))
            )
        # Start-up objects (policy, encoder, routes) never die: keep them out of every collection, and
        # collect the young generation less often — a request allocates a few thousand objects.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        traced = tracing.configure(settings.otel_endpoint)
        log.info(
            "gateway_started",
            policy=settings.policy,
            revision=serving.revision,
            tiers=list(serving.tiers),
            tracing=settings.otel_endpoint if traced else "off",
        )
        try:
            yield
        finally:
            # Every step is bounded, so shutdown ends even if something hangs; the flushes come after
            # the background tasks stop, so they run however those end.
            if metrics is not None:
                await _bounded("metrics_listener_close", metrics.close(), FLUSH_S)
            await _drain(runtime, DRAIN_S)
            await stop_tasks([health, settler, *background], STOP_TASKS_S)
            await _bounded("admission_flush", admitter.flush(), FLUSH_S)  # settlements of the last requests
            await _bounded("last_used_write", auth.write_last_used(), FLUSH_S)
            await _bounded("shadows_stop", runtime.shadows.stop(), FLUSH_S)  # their records, before the flush
            await _bounded("ledger_flush", ledger.flush(), LEDGER_FLUSH_S)  # to Redis, or to the spool
            await _bounded("response_index_flush", responses.flush(), FLUSH_S)
            request_log.flush()
            await _bounded("trace_flush", asyncio.to_thread(tracing.shutdown), FLUSH_S)
            closing = (client.aclose(), redis_client.aclose(), resp.close(), ledger_conn.close())
            await _bounded("close_connections", asyncio.gather(*closing, return_exceptions=True), FLUSH_S)

    async def add_request_id(response: Any) -> Any:
        """Every response carries ``x-gateway-request-id``. The pipeline's endpoints set their own
        (raw ASGI handlers never get here); every other handler's answer gets one here."""
        if isinstance(response, ASGIResponse) and REQUEST_ID not in response.headers:
            for name, value in _request_id(app).items():
                response.headers.add(name, value)
        return response

    app = Litestar(
        route_handlers=[*api.ROUTES, *admin.ROUTES, *openapi.ROUTES],
        after_request=add_request_id,
        lifespan=[lifespan],
        exception_handlers={
            GatewayError: gateway_error_handler,
            HTTPException: http_exception_handler,
            Exception: internal_error_handler,
        },
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    routed = app.asgi_handler
    pipeline = api.PIPELINE_PATHS

    async def governed_first(scope: Scope, receive: Receive, send: Send) -> None:
        """POSTs to the governed endpoints' exact paths go straight to the pipeline; everything else
        (and their other spellings) to Litestar's router."""
        endpoint = pipeline.get(scope["path"]) if scope.get("method") == "POST" else None  # http only
        if endpoint is None:
            await routed(scope, receive, send)
            return
        try:
            await api.serve(scope, receive, send, endpoint)
        except Exception:
            # what Litestar's exception handling would have answered (the pipeline answers its own errors)
            log.exception("unhandled_error", path=scope["path"])
            body = render("The gateway failed to handle the request.", "api_error", None, "internal_error")
            await Plain(500, body, "application/json", _request_id(app)).send(send, receive)

    app.asgi_handler = governed_first
    return app


def app_from_env() -> Litestar:
    """Factory for multi-process serving: each process builds its app from ``GATEWAY_*``."""
    return create_app(Settings.from_env())
