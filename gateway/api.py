"""The OpenAI-compatible endpoints. The handler reads like the pipeline it runs:

body → decode_request → tokens.count → facts → decide → dispatch → relay / respond → finish
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
from litestar import Request, asgi, get
from litestar.exceptions import MethodNotAllowedException
from litestar.handlers import ASGIRouteHandler, post
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from gateway import tokens, tracing
from gateway.admission import BudgetDowngrade
from gateway.errors import (
    BudgetExceeded,
    ClientDisconnected,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ShuttingDown,
    StateUnavailable,
    WorkerTimeout,
)
from gateway.exchange import Exchange
from gateway.facts import RequestFacts, gather
from gateway.policy.decide import AUTO_MODEL, decide
from gateway.policy.schema import Timeouts
from gateway.resp import REDIS_ERRORS
from gateway.respond import (
    JSON,
    LAST_SEND_S,
    SHUTDOWN_MESSAGE,
    DisconnectWatch,
    Plain,
    Relayed,
    absorb_cancel,
    cut_by_shutdown,
)
from gateway.runtime import Runtime
from gateway.schemas import Endpoint, ParsedRequest, decode_request, read_answer
from gateway.streaming import Outcome, StreamRelay

_encode = msgspec.json.Encoder().encode


def error_body(exc: GatewayError, endpoint: Endpoint | None = None) -> bytes:
    return exc.anthropic_body() if endpoint is not None and endpoint.anthropic else exc.body()


def error_response(exc: GatewayError, headers: dict[str, str], endpoint: Endpoint | None = None) -> ASGIResponse:
    """An error from a Litestar-routed handler."""
    return ASGIResponse(
        body=error_body(exc, endpoint), status_code=exc.status, media_type=JSON, headers={**headers, **exc.headers}
    )


def error_answer(exc: GatewayError, headers: dict[str, str], endpoint: Endpoint | None = None) -> Plain:
    """An error from the pipeline."""
    return Plain(exc.status, error_body(exc, endpoint), JSON, {**headers, **exc.headers})


def request_headers(scope: Scope) -> dict[str, str]:
    """The request's headers by (lower-case) name, the first of repeated ones — what Litestar's
    ``Request.headers.get`` answered, without building its multidict."""
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


async def gather_facts(rt: Runtime, parsed: ParsedRequest, headers: dict[str, str], tenant: str) -> RequestFacts:
    prompt_tokens = await tokens.count(parsed, rt.settings.tokenize_inline_chars)
    used = rt.budget_used_pct.get(tenant, 0)
    return gather(parsed, prompt_tokens, tenant, headers, rt.policy.header_names, used)


async def _read_body(headers: dict[str, str], receive: Receive, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away before sending its body
            raise InvalidRequest("The client disconnected before sending the whole body.")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
            parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def handle(headers: dict[str, str], receive: Receive, rt: Runtime, ex: Exchange) -> Plain | Relayed:
    """Run the pipeline for one request; the answer is sent, and ``ex.finish`` called, by the caller."""
    policy = ex.policy
    try:
        ex.principal = principal = await rt.auth.authenticate(headers, policy)
        parsed = decode_request(ex.endpoint, await _read_body(headers, receive, rt.settings.max_body_bytes))
        ex.facts = facts = await gather_facts(rt, parsed, headers, principal.tenant)
        ex.decision = decision = decide(policy, facts)
        if decision.shadow is not None:  # one check when the route has no shadow
            ex.shadow = rt.shadows.sample(decision.shadow, parsed)
        span = ex.trace.span
        admitting = time.time_ns() if span is not None else 0
        try:
            ex.admission = await rt.admitter.reserve(policy, principal, facts, decision, ex.request_id)
        except BudgetDowngrade as down:
            # the budget is spent: serve from the cheaper tier, and say so in x-gateway-route
            ex.decision = decision = msgspec.structs.replace(
                decision, route=f"{decision.route}+budget-downgrade", tier=down.tier, fallbacks=()
            )
            ex.admission = await rt.admitter.reserve(
                policy, principal, facts, decision, ex.request_id, enforce_budget=False
            )
        except GatewayError as exc:
            if span is not None:
                span.admission(admitting, time.time_ns(), exc.code or type(exc).__name__)
            raise
        if span is not None:
            span.admission(admitting, time.time_ns(), "admitted")
        ex.dispatched = time.perf_counter()
        loop = asyncio.get_running_loop()
        watch = DisconnectWatch(receive, loop, asyncio.current_task(loop))
        try:
            ex.upstream = upstream = await rt.dispatcher.dispatch(
                policy, decision, parsed, ex.request_id, facts.headers, ex.trace, principal
            )
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            raise ClientDisconnected("The client disconnected before the worker answered.") from None
        finally:
            watch.stop()
        if watch.gone:
            raise ClientDisconnected("The client disconnected as the worker answered.")
        ex.first_byte()
        ex.status = upstream.status
        if upstream.chunks is not None:
            relay = StreamRelay(
                upstream,
                endpoint=parsed.endpoint,
                client_wants_usage=parsed.client_wants_usage,
                idle_timeout=policy.tiers[upstream.tier].timeouts.idle,
                on_close=ex.finish_stream,
            )
            ex.detached = True  # the relay's close finishes the exchange
            return Relayed(relay, ex.headers())
        body = upstream.body or b""
        if upstream.status == 200:
            ex.usage, ex.response_id = read_answer(parsed.endpoint, body)
        else:
            ex.outcome = Outcome.ERROR
        return Plain(upstream.status, body, upstream.content_type or JSON, ex.headers())
    except GatewayError as exc:
        ex.error, ex.status, ex.outcome = exc, exc.status, _OUTCOMES.get(type(exc), Outcome.ERROR)
        if isinstance(exc, BudgetExceeded):
            rt.metrics.budget_rejection(exc.tenant)
        elif isinstance(exc, RateLimited):
            rt.metrics.rejection(exc.scope, exc.limit)
        return error_answer(exc, ex.headers(), ex.endpoint)


async def serve(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
    """One request to a governed endpoint (a POST to one of ``PIPELINE_PATHS``). ``app.create_app``
    calls it before Litestar's router, and Litestar routes here too (paths it normalizes); its
    parameter parsing and response pipeline (about a tenth of the CPU per request in the
    benchmark) are skipped."""
    rt: Runtime = scope["app"].state.runtime
    if rt.in_flight >= rt.settings.max_in_flight:
        # Shed before any work — no auth, no Redis, no body read — so what is accepted keeps its latency.
        rt.metrics.shed()
        await _overloaded(rt, endpoint).send(send, receive)
        return
    rt.in_flight += 1  # until the answer is sent; a stream's relay closes inside ``Relayed.send``
    try:
        await _serve_admitted(scope, receive, send, endpoint, rt)
    finally:
        rt.in_flight -= 1


async def _serve_admitted(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, rt: Runtime) -> None:
    ex = Exchange(
        rt.next_request_id(), endpoint, rt.policy, rt.admitter, rt.metrics, rt.ledger, rt.responses, rt.request_log
    )  # one policy snapshot per request
    answer: Plain | Relayed | None = None
    headers = request_headers(scope)
    if tracing.tracer is not None:
        ex.trace.span = tracing.start(endpoint.label, headers, time.time_ns())
    try:
        answer = await handle(headers, receive, rt, ex)
        await answer.send(send, receive)
    except asyncio.CancelledError as exc:
        if not cut_by_shutdown(exc):
            raise
        absorb_cancel()
        await _end_cut(ex, answer, send, receive)
    finally:
        # after the answer went out: settling admission and logging stay off the client's path
        if not ex.detached:
            await ex.finish()


async def _end_cut(ex: Exchange, answer: Plain | Relayed | None, send: Send, receive: Receive) -> None:
    """The request outlived the shutdown grace period. Cut before its answer was ready, the client
    gets a 503 ``shutting_down`` it can retry at once; the caller's ``finish`` then bills it (if it
    reached a worker) with outcome ``shutdown``."""
    ex.outcome = Outcome.SHUTDOWN
    if isinstance(answer, Relayed):  # cut before its body began: its relay still has to close
        answer.relay.outcome = Outcome.SHUTDOWN
        await answer.relay.close()
        return
    if answer is not None:  # cut while its answer was being sent: what went out stays
        return
    exc = ShuttingDown(SHUTDOWN_MESSAGE, headers={"retry-after": str(SHUTDOWN_RETRY_AFTER_S)})
    ex.error, ex.status = exc, exc.status
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LAST_SEND_S):
            await error_answer(exc, ex.headers(), ex.endpoint).send(send, receive)


SHUTDOWN_RETRY_AFTER_S = 1  # another replica (or this one, restarted) can take the request at once


def _overloaded(rt: Runtime, endpoint: Endpoint) -> Plain:
    retry = rt.settings.overload_retry_after_s
    exc = Overloaded(f"The gateway is at capacity; please retry in {retry}s.", headers={"retry-after": str(retry)})
    return error_answer(exc, {"x-gateway-request-id": rt.next_request_id()}, endpoint)


_OUTCOMES = {WorkerTimeout: Outcome.TIMEOUT, ClientDisconnected: Outcome.CLIENT_DISCONNECT}


def _pipeline_route(path: str, endpoint: Endpoint) -> ASGIRouteHandler:
    """A governed endpoint as Litestar routes it (``app.create_app`` takes the exact paths first)."""

    async def serve_routed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            raise MethodNotAllowedException(headers={"allow": "POST"})
        await serve(scope, receive, send, endpoint)

    return asgi(path, copy_scope=False, name=f"{endpoint.name.lower()}:{path}")(serve_routed)


PIPELINE_PATHS = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/v1/embeddings": Endpoint.EMBEDDINGS,
    "/v1/responses": Endpoint.RESPONSES,
    "/v1/messages": Endpoint.MESSAGES,
    "/v1/messages/count_tokens": Endpoint.COUNT_TOKENS,
    "/rerank": Endpoint.RERANK,
    "/v1/rerank": Endpoint.RERANK,
    "/score": Endpoint.SCORE,
    "/v1/score": Endpoint.SCORE,
    "/tokenize": Endpoint.TOKENIZE,
    "/detokenize": Endpoint.DETOKENIZE,
}


def _model(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "gateway"}


async def _follow_up(request: Request[Any, Any, Any], response_id: str, method: str, suffix: str) -> ASGIResponse:
    """A stored response's retrieval or cancel, sent to the worker that made it (vLLM keeps
    responses in that process). Only the tenant that made a response may reach it."""
    rt: Runtime = request.app.state.runtime
    request_id = rt.next_request_id()
    headers = {"x-gateway-request-id": request_id}
    try:
        principal = await rt.auth.authenticate(request.headers, rt.policy)
        try:
            holder = await rt.responses.lookup(response_id)
        except REDIS_ERRORS:
            raise StateUnavailable("The gateway cannot look up responses right now; try again shortly.") from None
        if holder is None or holder.tenant != principal.tenant:
            raise NotFound(f"No response found with id '{response_id}'.", param="response_id")
        tier = rt.policy.tiers.get(holder.tier)
        query = request.scope.get("query_string", b"").decode("latin-1")
        path = f"{Endpoint.RESPONSES.value}/{response_id}{suffix}" + (f"?{query}" if query else "")
        status, content_type, body = await rt.dispatcher.forward(
            holder.url, method, path, request_id, tier.timeouts if tier is not None else Timeouts()
        )
    except GatewayError as exc:
        return error_response(exc, headers)
    return ASGIResponse(body=body, status_code=status, media_type=content_type, headers=headers)


@get("/v1/responses/{response_id:str}")
async def response_get(request: Request[Any, Any, Any], response_id: str) -> ASGIResponse:
    return await _follow_up(request, response_id, "GET", "")


@post("/v1/responses/{response_id:str}/cancel", status_code=200)
async def response_cancel(request: Request[Any, Any, Any], response_id: str) -> ASGIResponse:
    return await _follow_up(request, response_id, "POST", "/cancel")


@get("/v1/models")
async def models(request: Request[Any, Any, Any]) -> ASGIResponse:
    rt: Runtime = request.app.state.runtime
    try:  # as OpenAI does: the model list is for key holders (under `auth: none`, for anyone)
        await rt.auth.authenticate(request.headers, rt.policy)
    except GatewayError as exc:
        return error_response(exc, {})
    created = int(rt.started)
    data = [_model(n, created) for n in (AUTO_MODEL, *sorted(rt.policy.aliases))]
    return ASGIResponse(body=_encode({"object": "list", "data": data}), media_type=JSON)


@get("/v1/models/{model_id:path}")
async def model(request: Request[Any, Any, Any], model_id: str) -> ASGIResponse:
    """One model (openai's ``models.retrieve``): the same names and the same key rule as the list."""
    rt: Runtime = request.app.state.runtime
    name = model_id.lstrip("/")  # a path parameter keeps its slash; model names may hold slashes
    policy = rt.policy
    try:
        await rt.auth.authenticate(request.headers, policy)
        if name != AUTO_MODEL and name not in policy.aliases:
            raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
    except GatewayError as exc:
        return error_response(exc, {})
    return ASGIResponse(body=_encode(_model(name, int(rt.started))), media_type=JSON)


_HEALTHY = b'{"status":"ok"}'


@get("/healthz")
async def healthz() -> ASGIResponse:
    return ASGIResponse(body=_HEALTHY, media_type=JSON)


@get("/health")
async def health() -> ASGIResponse:
    """vLLM's path, for clients that check a server the way they check vLLM (guidellm does)."""
    return ASGIResponse(body=_HEALTHY, media_type=JSON)


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> ASGIResponse:
    rt: Runtime = request.app.state.runtime
    tiers = {name: rt.pool.ready_count(name) for name in rt.policy.tiers}
    ready = all(n > 0 for n in tiers.values())
    body = {
        "status": "ready" if ready else "not_ready",
        "policy": {"revision": rt.policy.revision, "sha256": rt.policy.sha256},
        "tiers": {name: {"ready_workers": n} for name, n in tiers.items()},
        "uptime_s": round(time.time() - rt.started, 1),
    }
    return ASGIResponse(body=_encode(body), status_code=200 if ready else 503, media_type=JSON)


# No /metrics here: metrics carry every tenant's usage and have their own listener (metrics_listener.py).
ROUTES = [
    *(_pipeline_route(path, endpoint) for path, endpoint in PIPELINE_PATHS.items()),
    response_get,
    response_cancel,
    models,
    model,
    healthz,
    health,
    readyz,
]
