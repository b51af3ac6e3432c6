"""OpenTelemetry traces: off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``…_TRACES_ENDPOINT``) is set.

When on, each request gets one span (``gateway.request``) carrying the OpenTelemetry GenAI
semantic conventions (``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, …) and the gateway's own facts
(``gateway.route``, ``gateway.tier``, ``gateway.worker``, ``gateway.tenant``, ``gateway.cost_usd``,
``gateway.outcome``), with a child span for admission and one per upstream attempt. A W3C
``traceparent`` from the client makes the request span its child; the attempt's context goes to the
worker in ``traceparent`` (vLLM accepts it), so the worker's spans join the same trace.

Everything else is the SDK's own configuration from the standard ``OTEL_*`` variables (exporter
endpoint, headers, protocol, service name, resource attributes, sampler, batch delays); the
exporter is OTLP over HTTP/protobuf. When off, every hook is one test of a module-level ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

tracer: Tracer | None = None  # None: tracing is off


def configure(endpoint: str | None) -> bool:
    """Turn tracing on when an OTLP endpoint is configured (the URL spans are posted to); True if on."""
    global tracer
    if not endpoint:
        tracer = None
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "llm-gateway"}))
    provider = TracerProvider(resource=resource)
    # headers, compression, time-out: the exporter reads OTEL_EXPORTER_OTLP_* itself
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("gateway")
    return True


def shutdown() -> None:
    """Flush what is buffered (called once, at the end of the process's lifespan)."""
    if tracer is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


# https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/ — gen_ai.operation.name values
_OPERATIONS = {
    "chat": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}


class RequestSpan:
    """The spans of one request. Made only when tracing is on (``start`` returns None otherwise)."""

    __slots__ = ("_context", "span")

    def __init__(self, span: Span) -> None:
        from opentelemetry import trace

        self.span = span
        self._context = trace.set_span_in_context(span)

    def admission(self, start_ns: int, end_ns: int, outcome: str) -> None:
        assert tracer is not None
        child = tracer.start_span("gateway.admission", context=self._context, start_time=start_ns)
        child.set_attribute("gateway.admission.outcome", outcome)
        child.end(end_time=end_ns)

    def attempt(self, worker: str, tier: str, attempt: int) -> tuple[Span, dict[str, str]]:
        """A span for one upstream attempt, and the headers that carry its context to the worker."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert tracer is not None
        child = tracer.start_span(
            "gateway.upstream",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes={"server.address": worker, "gateway.tier": tier, "gateway.attempt": attempt},
        )
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(child))
        return child, carrier

    @staticmethod
    def attempt_done(child: Span, status: int | None, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if status is not None:
            child.set_attribute("http.response.status_code", status)
        if error is not None or (status is not None and status >= 500):
            child.set_status(Status(StatusCode.ERROR, error or f"HTTP {status}"))
        child.end()

    def finish(self, attributes: Mapping[str, Any], error: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


def start(endpoint_label: str, headers: Mapping[str, str], start_ns: int) -> RequestSpan | None:
    """The request's span, child of the client's ``traceparent`` if it sent one; None when off."""
    if tracer is None:
        return None
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(headers)
    operation = _OPERATIONS.get(endpoint_label, endpoint_label)
    span = tracer.start_span(
        "gateway.request",
        context=parent,
        kind=SpanKind.SERVER,
        start_time=start_ns,
        attributes={"gen_ai.operation.name": operation, "gen_ai.provider.name": "vllm"},
    )
    return RequestSpan(span)
