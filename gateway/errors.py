"""The gateway's one error tree, rendered to clients in OpenAI's error shape.

    GatewayError
    ├── ClientError                      4xx: the request is at fault; never retried
    │   ├── InvalidRequest               400 invalid_request_error
    │   │   └── NoRouteMatched           400 invalid_request_error / no_route_matched
    │   ├── NotFound                     404 invalid_request_error / not_found
    │   │   └── ModelNotFound            404 invalid_request_error / model_not_found
    │   ├── MethodNotAllowed             405 invalid_request_error
    │   └── PayloadTooLarge              413 invalid_request_error / request_too_large
    └── UpstreamError                    5xx: a worker is at fault; retryable before the first byte
        ├── WorkerUnavailable            502 api_error / worker_unavailable
        ├── NoHealthyWorker              503 api_error / no_healthy_worker (with Retry-After)
        └── WorkerTimeout                504 api_error / worker_timeout

Each class knows its HTTP status, its OpenAI error ``type`` and ``code``, whether a dispatch
attempt that raised it may be retried on another worker, and the level it is logged at.
``render`` turns any of them into the body OpenAI's SDKs parse.
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


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: ClassVar[str | None] = None
    log_level = "info"


class InvalidRequest(ClientError):
    status = 400


class NoRouteMatched(InvalidRequest):
    code = "no_route_matched"


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


class UpstreamError(GatewayError):
    status = 502
    type = "api_error"
    retryable = True
    log_level = "warning"


class WorkerUnavailable(UpstreamError):
    status = 502
    code = "worker_unavailable"


class NoHealthyWorker(UpstreamError):
    status = 503
    code = "no_healthy_worker"


class WorkerTimeout(UpstreamError):
    status = 504
    code = "worker_timeout"


_encoder = msgspec.json.Encoder()


def render(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return _encoder.encode(ErrorBody(ErrorDetail(message=message, type=type_, param=param, code=code)))
