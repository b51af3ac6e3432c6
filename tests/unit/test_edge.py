"""The edge's settings, and its protocol's journey to `gateway serve --workers N` processes."""

from __future__ import annotations

import pickle

import pytest

from gateway import edge
from gateway.settings import Settings


def test_edge_settings_defaults_and_bounds() -> None:
    s = Settings.from_env({})
    assert (s.max_header_bytes, s.max_headers) == (64 * 1024, 100)
    assert (s.head_timeout_s, s.body_timeout_s, s.keepalive_s) == (10.0, 30.0, 5.0)
    assert (s.metrics_host, s.metrics_port, s.metrics_token) == ("127.0.0.1", 9464, None)
    assert Settings.from_env({"GATEWAY_METRICS_PORT": "0"}).metrics_port == 0  # no metrics listener
    bad = [
        {"GATEWAY_HEAD_TIMEOUT_S": "0"},
        {"GATEWAY_BODY_TIMEOUT_S": "-1"},
        {"GATEWAY_KEEPALIVE_S": "0"},
        {"GATEWAY_MAX_HEADERS": "0"},
        {"GATEWAY_MAX_HEADER_BYTES": "100"},
        {"GATEWAY_METRICS_PORT": "70000"},
    ]
    for env in bad:
        with pytest.raises(ValueError, match="invalid setting"):
            Settings.from_env(env)


def test_the_protocol_pickles_for_worker_processes() -> None:
    """uvicorn hands its config, protocol included, to each process it spawns."""
    made = edge.protocol(Settings.from_env({"GATEWAY_MAX_HEADERS": "7", "GATEWAY_HEAD_TIMEOUT_S": "1.5"}))
    again = pickle.loads(pickle.dumps(made))
    assert again.func is edge.EdgeProtocol
    assert again.keywords["limits"] == edge.EdgeLimits(
        max_header_bytes=64 * 1024, max_headers=7, head_timeout_s=1.5, body_timeout_s=30.0
    )
