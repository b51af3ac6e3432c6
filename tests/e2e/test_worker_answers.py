"""A worker's answer is checked too: a redirect, bytes that are not HTTP, a 2xx other than 200, a
200 of the wrong content type or a response head past the bounds are a worker failure — retried
on another worker, or a 502 — and never relayed to the client."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, Sim, two_tier_policy

pytestmark = pytest.mark.e2e
MSG = [{"role": "user", "content": "hello"}]
FAULTS = [
    {"redirect": True},
    {"garbage": True},
    {"status": 204},
    {"status": 202},
    {"content_type": "text/html; charset=utf-8"},
    {"huge_headers": True},
]


@pytest.mark.parametrize("fault", FAULTS, ids=str)
def test_a_bad_answer_fails_over_to_another_worker(
    fault: dict[str, object], tmp_path: Path, sims: tuple[Sim, Sim, Sim]
) -> None:
    small, f1, f2 = sims
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [f1.url, f2.url]))
    gw = Gateway(policy, tmp_path)
    try:
        f1.faults(**fault)
        for stream in (False, True, False, True, False, True):
            body = {"model": "auto", "messages": MSG, "stream": stream}
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=10)
            assert r.status_code == 200, r.text
            assert "tiny-frontier" in r.text
        assert f1.stats()["errors"] >= 1  # the faulty worker was tried ...
        assert f2.stats()["completed"] == 6  # ... and every request was served by the other
    finally:
        gw.stop()


@pytest.mark.parametrize("fault", FAULTS, ids=str)
def test_bad_answers_from_every_worker_are_a_502(
    fault: dict[str, object], tmp_path: Path, sims: tuple[Sim, Sim, Sim]
) -> None:
    small, f1, f2 = sims
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy([small.url], [f1.url, f2.url]))
    gw = Gateway(policy, tmp_path)
    try:
        f1.faults(**fault)
        f2.faults(**fault)
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": MSG}, timeout=10)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "worker_unavailable"
        assert "location" not in r.headers
        assert f1.stats()["errors"] + f2.stats()["errors"] == 2  # both were tried, once each
    finally:
        gw.stop()
