"""OpenTelemetry traces, exported over OTLP/HTTP to a real receiver in the test process: one span
per request with the GenAI attributes, admission and upstream attempts as its children, the
client's ``traceparent`` honoured and the attempt's forwarded to the worker."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.otlp import Receiver
from tests.procs import Gateway, RedisServer, Sim, two_tier_policy

pytestmark = pytest.mark.e2e

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@dataclass
class Traced:
    receiver: Receiver
    gateway: Gateway
    small: Sim
    frontier: Sim


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    tmp = tmp_path_factory.mktemp("tracing")
    receiver = Receiver()
    redis = RedisServer(tmp)
    small, frontier = Sim("tiny-small", tmp), Sim("tiny-frontier", tmp)
    policy = tmp / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [frontier.url]))
    env = {
        "GATEWAY_REDIS_URL": redis.url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms rather than 5 s
        "OTEL_SERVICE_NAME": "gateway-under-test",
    }
    gateway = Gateway(policy, tmp, env)
    try:
        yield Traced(receiver, gateway, small, frontier)
    finally:
        gateway.stop()
        small.stop()
        frontier.stop()
        redis.stop()
        receiver.close()


def _trace_of(receiver: Receiver, request_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request span with this request id, and its children (waiting until they have all arrived)."""

    def found(spans: list[dict[str, Any]]) -> bool:
        return any(s["attributes"].get("gateway.request_id") == request_id for s in spans)

    spans = receiver.wait_for(found)
    request = next(s for s in spans if s["attributes"].get("gateway.request_id") == request_id)
    # children end before their parent, so they were exported with it or before it
    children = [s for s in spans if s["parent_span_id"] == request["span_id"]]
    return request, children


def test_a_request_span_carries_genai_attributes_and_admission_and_upstream_children(traced: Traced) -> None:
    r = httpx.post(
        f"{traced.gateway.url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "Sports or politics?"}], "max_tokens": 5}
        | {"metadata": {"task": "classification"}},
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-gateway-tenant": "media"},
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    request, children = _trace_of(traced.receiver, r.headers["x-gateway-request-id"])
    assert request["name"] == "gateway.request"
    assert (request["trace_id"], request["parent_span_id"]) == (CLIENT_TRACE, CLIENT_SPAN)  # the client's trace
    assert request["resource"]["service.name"] == "gateway-under-test"
    a = request["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "vllm"
    assert a["gen_ai.request.model"] == "auto" and a["gen_ai.response.model"] == "tiny-small"
    assert a["gen_ai.request.max_tokens"] == 5
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert (a["gateway.route"], a["gateway.tier"], a["gateway.worker"]) == ("classify", "small", traced.small.url)
    assert a["gateway.tenant"] == "media" and a["gateway.outcome"] == "ok" and a["http.response.status_code"] == 200
    expected_cost = (usage["prompt_tokens"] * 0.10 + usage["completion_tokens"] * 0.40) / 1e6  # the small tier's price
    assert a["gateway.cost_usd"] == pytest.approx(expected_cost)
    by_name = {c["name"]: c for c in children}
    assert set(by_name) == {"gateway.admission", "gateway.upstream"}, children
    admission, upstream = by_name["gateway.admission"], by_name["gateway.upstream"]
    assert admission["attributes"]["gateway.admission.outcome"] == "admitted"
    assert request["start"] <= admission["start"] <= admission["end"] <= upstream["start"] <= request["end"]
    assert upstream["attributes"]["server.address"] == traced.small.url
    assert upstream["attributes"]["http.response.status_code"] == 200
    # the worker got the attempt's context, so its own spans join the same trace under the attempt
    sent = {k.lower(): v for k, v in traced.small.stats()["last_headers"].items()}
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{upstream['span_id']}-01"


def test_a_stream_is_traced_to_its_end_and_a_failed_attempt_is_an_error_child(traced: Traced) -> None:
    traced.small.faults(error_rate=1.0)  # the small worker answers 500: the request falls back to frontier
    try:
        with httpx.stream(
            "POST",
            f"{traced.gateway.url}/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "Label this"}], "stream": True}
            | {"metadata": {"task": "classification"}, "max_tokens": 8},
        ) as r:
            assert r.status_code == 200
            body = r.read().decode()
            request_id = r.headers["x-gateway-request-id"]
    finally:
        traced.small.faults()
    assert body.rstrip().endswith("data: [DONE]")
    request, children = _trace_of(traced.receiver, request_id)
    assert request["trace_id"] != CLIENT_TRACE and request["parent_span_id"] == ""  # a new trace: no traceparent
    assert request["attributes"]["gateway.tier"] == "frontier" and request["attributes"]["gateway.attempts"] == 2
    assert request["attributes"]["gen_ai.usage.output_tokens"] > 0  # read from the stream's end
    attempts = sorted((c for c in children if c["name"] == "gateway.upstream"), key=lambda c: c["start"])
    assert [c["attributes"]["server.address"] for c in attempts] == [traced.small.url, traced.frontier.url]
    assert attempts[0]["status"] == 2 and attempts[1]["status"] != 2  # STATUS_CODE_ERROR, then not


def test_a_refused_request_is_an_error_span_without_children(traced: Traced) -> None:
    r = httpx.post(f"{traced.gateway.url}/v1/chat/completions", content=b'{"model": "auto"}')
    assert r.status_code == 400
    request, children = _trace_of(traced.receiver, r.headers["x-gateway-request-id"])
    assert request["status"] == 2 and request["attributes"]["http.response.status_code"] == 400
    assert children == []


def test_tracing_off_loads_no_opentelemetry(tmp_path: Path) -> None:
    """With no OTLP endpoint set, the gateway never loads the trace SDK or an exporter: every hook is
    one None test. (redis-py imports OpenTelemetry's metrics SDK for its own, unused, observability.)"""
    code = (
        "import sys; from gateway import tracing; from gateway.settings import Settings; "
        "assert tracing.configure(Settings.from_env({}).otel_endpoint) is False; "
        "import gateway.app, gateway.api, gateway.dispatch, gateway.exchange; "
        "assert tracing.tracer is None; "
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter'))))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd())
    assert out.stdout.strip() == "[]"
