"""The OpenAI-compatible endpoints. The handler reads like the pipeline it runs:

body → decode_request → tokens.count → facts → decide → dispatch → relay / respond → finish
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import structlog
from litestar import Request, asgi, get
from litestar.exceptions import MethodNotAllowedException
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Scope, Send

from gateway import tokens
from gateway.admission import BudgetDowngrade
from gateway.errors import BudgetExceeded, GatewayError, InvalidRequest, Overloaded, PayloadTooLarge, RateLimited
from gateway.exchange import Exchange
from gateway.facts import RequestFacts, gather
from gateway.metrics import exposition
from gateway.policy.decide import AUTO_MODEL, decide
from gateway.runtime import Runtime
from gateway.schemas import Endpoint, ParsedRequest, decode_request, read_usage
from gateway.streaming import StreamRelay

JSON = "application/json"
_encode = msgspec.json.Encoder().encode


class RelayResponse(ASGIStreamingResponse):
    """A streaming response whose relay is closed however sending ends (done, failed, or disconnect)."""

    def __init__(self, relay: StreamRelay, headers: dict[str, str]):
        super().__init__(iterator=relay, headers=headers, media_type="text/event-stream", status_code=200)
        self.relay = relay

    async def send_body(self, send: Send, receive: Receive) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            with anyio.CancelScope(shield=True):
                await self.relay.close()


def error_response(exc: GatewayError, headers: dict[str, str]) -> ASGIResponse:
    return ASGIResponse(body=exc.body(), status_code=exc.status, media_type=JSON, headers={**headers, **exc.headers})


async def gather_facts(
    rt: Runtime, parsed: ParsedRequest, request: Request[Any, Any, Any], tenant: str
) -> RequestFacts:
    prompt_tokens = await tokens.count(parsed, rt.settings.tokenize_inline_chars)
    used = rt.budget_used_pct.get(tenant, 0)
    return gather(parsed, prompt_tokens, tenant, request.headers, rt.policy.header_names, used)


async def _read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
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


async def handle(request: Request[Any, Any, Any], rt: Runtime, ex: Exchange) -> ASGIResponse:
    """Run the pipeline for one request; the response is sent, and ``ex.finish`` called, by the caller."""
    policy = ex.policy
    try:
        ex.principal = principal = await rt.auth.authenticate(request.headers, policy)
        parsed = decode_request(ex.endpoint, await _read_body(request, rt.settings.max_body_bytes))
        ex.facts = facts = await gather_facts(rt, parsed, request, principal.tenant)
        ex.decision = decision = decide(policy, facts)
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
        ex.dispatched = time.perf_counter()
        ex.upstream = upstream = await rt.dispatcher.dispatch(policy, decision, parsed, ex.request_id, facts.headers)
        ex.first_byte()
        ex.status = upstream.status
        if upstream.chunks is not None:
            relay = StreamRelay(
                upstream,
                client_wants_usage=parsed.client_wants_usage,
                idle_timeout=policy.tiers[upstream.tier].timeouts.idle,
                on_close=ex.finish_stream,
            )
            ex.detached = True  # the relay's close finishes the exchange
            return RelayResponse(relay, ex.headers())
        body = upstream.body or b""
        if upstream.status == 200:
            ex.usage = read_usage(body)
        else:
            ex.outcome = "error"
        content_type = upstream.response.headers.get("content-type", JSON)
        return ASGIResponse(body=body, status_code=upstream.status, media_type=content_type, headers=ex.headers())
    except GatewayError as exc:
        ex.error, ex.status, ex.outcome = exc, exc.status, "error"
        if isinstance(exc, BudgetExceeded):
            rt.metrics.budget_rejection(exc.tenant)
        elif isinstance(exc, RateLimited):
            rt.metrics.rejection(exc.scope, exc.limit)
        return error_response(exc, ex.headers())


async def _serve(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
    # The two hot endpoints are plain ASGI handlers: Litestar still routes them, but its parameter
    # parsing and response pipeline (about a tenth of the CPU per request in the benchmark) is skipped.
    if scope.get("method") != "POST":
        raise MethodNotAllowedException(headers={"allow": "POST"})
    rt: Runtime = scope["app"].state.runtime
    if rt.in_flight >= rt.settings.max_in_flight:
        # Shed before any work — no auth, no Redis, no body read — so what is accepted keeps its latency.
        rt.metrics.shed()
        await _overloaded(rt)(scope, receive, send)
        return
    rt.in_flight += 1  # until the response is sent; a stream's relay closes inside ``response(...)``
    try:
        await _serve_admitted(scope, receive, send, endpoint, rt)
    finally:
        rt.in_flight -= 1


async def _serve_admitted(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, rt: Runtime) -> None:
    request: Request[Any, Any, Any] = Request(scope, receive)
    ex = Exchange(
        rt.next_request_id(), endpoint, rt.policy, rt.admitter, rt.metrics, rt.ledger
    )  # one policy snapshot per request
    structlog.contextvars.bind_contextvars(request_id=ex.request_id)
    try:
        response = await handle(request, rt, ex)
        await response(scope, receive, send)
    finally:
        # after the response went out: settling admission and logging stay off the client's path
        if not ex.detached:
            await ex.finish()
        structlog.contextvars.unbind_contextvars("request_id")


def _overloaded(rt: Runtime) -> ASGIResponse:
    retry = rt.settings.overload_retry_after_s
    exc = Overloaded(f"The gateway is at capacity; please retry in {retry}s.", headers={"retry-after": str(retry)})
    return error_response(exc, {"x-gateway-request-id": rt.next_request_id()})


@asgi("/v1/chat/completions", copy_scope=False)
async def chat_completions(scope: Scope, receive: Receive, send: Send) -> None:
    await _serve(scope, receive, send, Endpoint.CHAT)


@asgi("/v1/completions", copy_scope=False)
async def completions(scope: Scope, receive: Receive, send: Send) -> None:
    await _serve(scope, receive, send, Endpoint.COMPLETIONS)


@get("/v1/models")
async def models(request: Request[Any, Any, Any]) -> ASGIResponse:
    rt: Runtime = request.app.state.runtime
    created = int(rt.started)
    names = [AUTO_MODEL, *sorted(rt.policy.aliases)]
    data = [{"id": n, "object": "model", "created": created, "owned_by": "gateway"} for n in names]
    return ASGIResponse(body=_encode({"object": "list", "data": data}), media_type=JSON)


@get("/healthz")
async def healthz() -> ASGIResponse:
    return ASGIResponse(body=b'{"status":"ok"}', media_type=JSON)


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


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> ASGIResponse:
    rt: Runtime = request.app.state.runtime
    body, content_type = exposition(rt.settings.metrics_dir)
    return ASGIResponse(body=body, media_type=content_type)


ROUTES = [chat_completions, completions, models, healthz, readyz, metrics]
