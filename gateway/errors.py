"""The gateway's one error tree, rendered to clients in OpenAI's error shape.

    GatewayError
    ├── ClientError                      4xx: the request is at fault; never retried
    │   ├── InvalidRequest               400 invalid_request_error
    │   │   ├── NoRouteMatched           400 invalid_request_error / no_route_matched
    │   │   │   └── ContextTooLong       400 invalid_request_error / context_length_exceeded
    │   │   └── JsonTooDeep              400 invalid_request_error / json_too_deep
    │   │   └── InvalidPolicy            400 invalid_request_error / invalid_policy (with every problem)
    │   ├── AuthenticationFailed         401 invalid_request_error / invalid_api_key
    │   ├── AdminForbidden               403 invalid_request_error / forbidden
    │   ├── RateLimited                  429 requests|tokens / rate_limit_exceeded (with Retry-After)
    │   │   └── BudgetExceeded           429 insufficient_quota / insufficient_quota
    │   ├── NotFound                     404 invalid_request_error / not_found
    │   │   └── ModelNotFound            404 invalid_request_error / model_not_found
    │   ├── MethodNotAllowed             405 invalid_request_error / method_not_allowed
    │   └── PayloadTooLarge              413 invalid_request_error / request_too_large
    ├── StateUnavailable                 503 api_error / state_unavailable: Redis did not answer (fail_closed)
    ├── Overloaded                       503 api_error / overloaded: too many requests in flight (with Retry-After)
    ├── ShuttingDown                     503 api_error / shutting_down: the shutdown grace period ran out (Retry-After)
    └── UpstreamError                    5xx: a worker is at fault; retryable before the first byte
        ├── WorkerUnavailable            502 api_error / worker_unavailable
        ├── NoHealthyWorker              503 api_error / no_healthy_worker (with Retry-After); not retried
        └── WorkerTimeout                504 api_error / worker_timeout
    ClientDisconnected                   499, never sent: the client left while a worker worked

Each class knows its HTTP status, its OpenAI error ``type`` and ``code``, whether a dispatch
attempt that raised it may be retried on another worker, and the level it is logged at.
``render`` turns any of them into the body OpenAI's SDKs parse. A ``GatewayError`` that leaves a
handler is answered by the app's one exception handler (``app.gateway_error_handler``); Litestar's
own HTTP errors are mapped onto this tree by status (``for_status``).
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str | None] = "internal_error"
    retryable: ClassVar[bool] = False
    log_level: ClassVar[str] = "error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return render(self.message, self.type, self.param, self.code)

    def anthropic_body(self) -> bytes:
        """The error in Anthropic's shape, for the Messages endpoints (its SDK reads this one)."""
        return render_anthropic(self.message, self.status)


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: ClassVar[str | None] = None
    log_level = "info"


class InvalidRequest(ClientError):
    status = 400


class TooLargeForLimit(InvalidRequest):
    """The request alone needs more than a limit (tokens per minute, a budget) can ever grant:
    a 429 would invite retries that can never succeed."""

    code = "request_over_limit"


class NoRouteMatched(InvalidRequest):
    code = "no_route_matched"


class ContextTooLong(NoRouteMatched):
    """A route matched, but the request (prompt + max_tokens) fits none of its tiers' contexts."""

    code = "context_length_exceeded"


class JsonTooDeep(InvalidRequest):
    """A JSON body nested deeper than the gateway reads (``gateway.jsondepth``)."""

    code = "json_too_deep"


class InvalidPolicy(InvalidRequest):
    """A policy refused by the loader: the message lists every ``FILE:LINE: message`` problem, and
    the body carries them as a list too (``problems``)."""

    code = "invalid_policy"

    def __init__(self, problems: list[str]):
        super().__init__("The policy is invalid:\n" + "\n".join(problems))
        self.problems = problems

    def body(self) -> bytes:
        detail = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        return _encoder.encode({"error": {**detail, "problems": self.problems}})


class AuthenticationFailed(ClientError):
    status = 401
    code = "invalid_api_key"


class AdminForbidden(ClientError):
    status = 403
    code = "forbidden"


class RateLimited(ClientError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        limit_type: str,
        scope: str = "",
        limit: str = "",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, headers=headers)
        self.limit_type = limit_type
        self.scope = scope  # which limit refused, for metrics
        self.limit = limit

    def body(self) -> bytes:
        return render(self.message, self.limit_type, None, self.code)


class BudgetExceeded(RateLimited):
    code = "insufficient_quota"

    def __init__(self, message: str, *, tenant: str, headers: dict[str, str] | None = None):
        super().__init__(message, limit_type="insufficient_quota", scope="budget", limit="usd", headers=headers)
        self.tenant = tenant


class NotFound(ClientError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class StateUnavailable(GatewayError):
    status = 503
    type = "api_error"
    code = "state_unavailable"
    log_level = "error"


class Overloaded(GatewayError):
    """This process already has ``GATEWAY_MAX_IN_FLIGHT`` requests in flight: refused at once, before
    any work (no auth, no Redis), so the requests it did accept keep their latency."""

    status = 503
    type = "api_error"
    code = "overloaded"
    log_level = "warning"


class TierSaturated(GatewayError):
    """Every worker of the tier is at its ``max_inflight`` and the request could not wait longer:
    the tier's queue was full, or the request waited ``queue_timeout_ms`` without a turn."""

    status = 503
    type = "api_error"
    code = "tier_saturated"
    log_level = "warning"


class ShuttingDown(GatewayError):
    """The process stopped (``GATEWAY_SHUTDOWN_GRACE_S`` ran out) before the answer was ready: the
    request is dropped, so the client may retry at once — another replica, or this one restarted."""

    status = 503
    type = "api_error"
    code = "shutting_down"
    log_level = "warning"


class UpstreamError(GatewayError):
    status = 502
    type = "api_error"
    retryable = True
    log_level = "warning"


class WorkerUnavailable(UpstreamError):
    status = 502
    code = "worker_unavailable"


class NoHealthyWorker(UpstreamError):
    """Every worker of the tier and its fallbacks was tried or is unhealthy: nothing left to retry on."""

    status = 503
    code = "no_healthy_worker"
    retryable = False


class WorkerTimeout(UpstreamError):
    status = 504
    code = "worker_timeout"


class ClientDisconnected(GatewayError):
    """The client went away before the answer was ready; nobody reads this response (logged 499)."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"
    log_level = "info"


_encoder = msgspec.json.Encoder()


def render(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return _encoder.encode(ErrorBody(ErrorDetail(message=message, type=type_, param=param, code=code)))


_BY_STATUS: dict[int, type[ClientError]] = {
    400: InvalidRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def for_status(status: int, message: str, headers: dict[str, str] | None = None) -> GatewayError | None:
    """The error of this tree that answers an HTTP ``status`` raised outside it (Litestar's 404, 405…);
    None for a status the tree has no class for."""
    cls = _BY_STATUS.get(status)
    return cls(message, headers=headers) if cls is not None else None


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def render_anthropic(message: str, status: int) -> bytes:
    """``{"type": "error", "error": {"type": …, "message": …}}`` with Anthropic's type for ``status``."""
    error_type = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return _encoder.encode({"type": "error", "error": {"type": error_type, "message": message}})
