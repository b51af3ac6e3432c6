"""The OpenAI-compatible endpoints. The handler reads like the pipeline it runs:

body → decode_request → tokens.count → facts → decide → dispatch → relay / respond → finish
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import anyio
import msgspec
import structlog
from litestar import Request, asgi, get
from litestar.exceptions import MethodNotAllowedException
from litestar.handlers import ASGIRouteHandler, post
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Message, Receive, Scope, Send

from gateway import tokens
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
from gateway.runtime import Runtime
from gateway.schemas import Endpoint, ParsedRequest, decode_request, read_answer
from gateway.streaming import Outcome, StreamRelay, stream_error

JSON = "application/json"
_encode = msgspec.json.Encoder().encode


class RelayResponse(ASGIStreamingResponse):
    """A streaming response whose relay is closed however sending ends (done, failed, or disconnect).
    A stream still running when the shutdown grace period is over ends with an error event in its
    dialect (code ``shutting_down``) and a proper end of body, rather than a connection cut mid-body."""

    def __init__(self, relay: StreamRelay, headers: dict[str, str]):
        super().__init__(iterator=relay, headers=headers, media_type="text/event-stream", status_code=200)
        self.relay = relay
        self.completed = False  # the body's last message went out

    async def send_body(self, send: Send, receive: Receive) -> None:
        async def send_tracked(message: Message) -> None:
            await send(message)
            if not message.get("more_body", False):
                self.completed = True

        try:
            await super().send_body(send_tracked, receive)
        except asyncio.CancelledError as exc:
            if not _cut_by_shutdown(exc):
                raise
            _absorb_cancel()
            await self._end_cut(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.relay.close()

    async def _end_cut(self, send: Send) -> None:
        if self.completed:
            return
        relay = self.relay
        events = b""
        if relay.outcome is Outcome.CLIENT_DISCONNECT:  # the relay had not seen the stream end
            relay.outcome = Outcome.SHUTDOWN
            events = stream_error(relay.endpoint, SHUTDOWN_MESSAGE, ShuttingDown.code)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_LAST_SEND_S):
                if events:
                    await send({"type": "http.response.body", "body": events, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})


SHUTDOWN_MESSAGE = "The gateway is shutting down; please retry the request."
_LAST_SEND_S = 0.5  # the last bytes to a client cut by shutdown: one that does not read them is not waited for


def _cut_by_shutdown(exc: asyncio.CancelledError) -> bool:
    """uvicorn cancels the requests still running when the shutdown grace period is over, with a
    message saying so ("Task cancelled, timeout graceful shutdown exceeded")."""
    return "shutdown" in str(exc)


def _absorb_cancel() -> None:
    """The request task handled its cancellation (its client got an answer): it ends normally, so
    uvicorn logs no traceback and sends no bare 500 of its own."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def error_response(exc: GatewayError, headers: dict[str, str], endpoint: Endpoint | None = None) -> ASGIResponse:
    body = exc.anthropic_body() if endpoint is not None and endpoint.anthropic else exc.body()
    return ASGIResponse(body=body, status_code=exc.status, media_type=JSON, headers={**headers, **exc.headers})


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


class DisconnectWatch:
    """While the worker works and the client waits, notice the client leaving: then the waiting
    task is cancelled, which closes the worker's connection (the worker aborts the generation).
    The body has been read, so the next ASGI message can only be ``http.disconnect``. The watching
    task starts only once the wait has lasted ``AFTER_S``: most answers come sooner, and a timer is
    several times cheaper than a task (a departure is then noticed within ``AFTER_S``, not at once)."""

    AFTER_S = 0.05
    __slots__ = ("gone", "receive", "task", "timer", "watcher")

    def __init__(self, receive: Receive):
        self.gone = False
        self.receive = receive
        self.task = asyncio.current_task()
        self.watcher: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(self.AFTER_S, self._start)

    def _start(self) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        message = await self.receive()
        if message["type"] == "http.disconnect" and self.task is not None:
            self.gone = True
            self.task.cancel()

    def stop(self) -> None:
        """Stop watching; if the client left just as the answer came, absorb the cancel it sent."""
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
        if self.gone and self.task is not None and self.task.cancelling():
            self.task.uncancel()


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
        watch = DisconnectWatch(request.receive)
        try:
            ex.upstream = upstream = await rt.dispatcher.dispatch(
                policy, decision, parsed, ex.request_id, facts.headers, ex.trace
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
            return RelayResponse(relay, ex.headers())
        body = upstream.body or b""
        if upstream.status == 200:
            ex.usage, ex.response_id = read_answer(parsed.endpoint, body)
        else:
            ex.outcome = Outcome.ERROR
        content_type = upstream.response.headers.get("content-type", JSON)
        return ASGIResponse(body=body, status_code=upstream.status, media_type=content_type, headers=ex.headers())
    except GatewayError as exc:
        ex.error, ex.status, ex.outcome = exc, exc.status, _OUTCOMES.get(type(exc), Outcome.ERROR)
        if isinstance(exc, BudgetExceeded):
            rt.metrics.budget_rejection(exc.tenant)
        elif isinstance(exc, RateLimited):
            rt.metrics.rejection(exc.scope, exc.limit)
        return error_response(exc, ex.headers(), ex.endpoint)


async def _serve(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
    # The two hot endpoints are plain ASGI handlers: Litestar still routes them, but its parameter
    # parsing and response pipeline (about a tenth of the CPU per request in the benchmark) is skipped.
    if scope.get("method") != "POST":
        raise MethodNotAllowedException(headers={"allow": "POST"})
    rt: Runtime = scope["app"].state.runtime
    if rt.in_flight >= rt.settings.max_in_flight:
        # Shed before any work — no auth, no Redis, no body read — so what is accepted keeps its latency.
        rt.metrics.shed()
        await _overloaded(rt, endpoint)(scope, receive, send)
        return
    rt.in_flight += 1  # until the response is sent; a stream's relay closes inside ``response(...)``
    try:
        await _serve_admitted(scope, receive, send, endpoint, rt)
    finally:
        rt.in_flight -= 1


async def _serve_admitted(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, rt: Runtime) -> None:
    request: Request[Any, Any, Any] = Request(scope, receive)
    ex = Exchange(
        rt.next_request_id(), endpoint, rt.policy, rt.admitter, rt.metrics, rt.ledger, rt.responses
    )  # one policy snapshot per request
    structlog.contextvars.bind_contextvars(request_id=ex.request_id)
    response: ASGIResponse | None = None
    try:
        response = await handle(request, rt, ex)
        await response(scope, receive, send)
    except asyncio.CancelledError as exc:
        if not _cut_by_shutdown(exc):
            raise
        _absorb_cancel()
        await _end_cut(ex, response, scope, receive, send)
    finally:
        # after the response went out: settling admission and logging stay off the client's path
        if not ex.detached:
            await ex.finish()
        structlog.contextvars.unbind_contextvars("request_id")


async def _end_cut(ex: Exchange, response: ASGIResponse | None, scope: Scope, receive: Receive, send: Send) -> None:
    """The request outlived the shutdown grace period. Cut before its answer was ready, the client
    gets a 503 ``shutting_down`` it can retry at once; the caller's ``finish`` then bills it (if it
    reached a worker) with outcome ``shutdown``."""
    ex.outcome = Outcome.SHUTDOWN
    if isinstance(response, RelayResponse):  # cut before its body began: its relay still has to close
        response.relay.outcome = Outcome.SHUTDOWN
        await response.relay.close()
        return
    if response is not None:  # cut while its answer was being sent: what went out stays
        return
    exc = ShuttingDown(SHUTDOWN_MESSAGE, headers={"retry-after": str(SHUTDOWN_RETRY_AFTER_S)})
    ex.error, ex.status = exc, exc.status
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_LAST_SEND_S):
            await error_response(exc, ex.headers(), ex.endpoint)(scope, receive, send)


SHUTDOWN_RETRY_AFTER_S = 1  # another replica (or this one, restarted) can take the request at once


def _overloaded(rt: Runtime, endpoint: Endpoint) -> ASGIResponse:
    retry = rt.settings.overload_retry_after_s
    exc = Overloaded(f"The gateway is at capacity; please retry in {retry}s.", headers={"retry-after": str(retry)})
    return error_response(exc, {"x-gateway-request-id": rt.next_request_id()}, endpoint)


_OUTCOMES = {WorkerTimeout: Outcome.TIMEOUT, ClientDisconnected: Outcome.CLIENT_DISCONNECT}


def _pipeline_route(path: str, endpoint: Endpoint) -> ASGIRouteHandler:
    """The governed endpoints are plain ASGI handlers: Litestar still routes them, but its parameter
    parsing and response pipeline (about a tenth of the CPU per request in the benchmark) is skipped."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        await _serve(scope, receive, send, endpoint)

    return asgi(path, copy_scope=False, name=f"{endpoint.name.lower()}:{path}")(serve)


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
