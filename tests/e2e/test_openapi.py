"""The gateway's OpenAPI description, and schemathesis run against a real gateway process with it:
no server error, every status, content type and body as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, admin_stack

pytestmark = pytest.mark.e2e
ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("openapi")
    with admin_stack(tmp) as gw:
        yield gw


def test_the_description_is_served_and_covers_the_api(gateway: Gateway) -> None:
    r = httpx.get(f"{gateway.url}/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    served = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/admin/keys", "/admin/policy"}
    served |= {  # issue 13's endpoints
        "/v1/embeddings",
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/responses/{response_id}/cancel",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/models/{model_id}",
        "/health",
        "/rerank",
        "/v1/score",
        "/tokenize",
        "/detokenize",
    }
    assert served <= set(doc["paths"])
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], f"{method} {path} documents no response"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(gateway: Gateway, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "st"
    run = subprocess.run(
        [
            str(st),
            "run",
            f"{gateway.url}/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "25",
            "--seed",
            "12",  # reproducible; raise --max-examples locally to search wider
            "--workers",
            "1",
            "--header",
            f"Authorization: Bearer {ADMIN}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert " passed" in out and "failures" not in out.lower(), out[-3000:]
    # the run reached the workers on every routed endpoint, not only the error paths
    answered = {
        json.loads(line)["endpoint"]
        for line in gateway.log_lines()
        if '"event":"request"' in line and '"status":200' in line
    }
    routed = {"chat", "completions", "embeddings", "responses", "messages", "count_tokens"}
    assert routed | {"rerank", "score", "tokenize", "detokenize"} <= answered, answered
