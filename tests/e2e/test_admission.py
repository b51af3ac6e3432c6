"""Admission end to end: API keys and rate limits across three gateway replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway import tokens
from tests.procs import ClusterServer, Gateway, Replicas, cluster_if_asked, gateway_cli
from tests.wait import until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MSG = [{"role": "user", "content": "hello there"}]
CONCURRENCY = 4
RPM = 10
TPM = 1000

POLICY = """version: 1
tiers:
  small:
    model: tiny-small
    workers: [{{url: "{small}"}}]
    price: {{input: 0.1, output: 0.4}}
  frontier:
    model: tiny-frontier
    workers: [{{url: "{frontier}"}}]
    price: {{input: 3, output: 15}}
routes:
  - {{name: classify, match: {{task: [classification]}}, tier: small}}
  - {{name: media-route, match: {{tenant: [media]}}, tier: small}}
  - {{name: default, tier: frontier}}
limits:
  - {{scope: key, tenant: rpm-test, rpm: {rpm}}}
  - {{scope: key, tenant: tpm-test, tpm: {tpm}}}
  - {{scope: key, tenant: conc-test, concurrency: {concurrency}}}
  - {{scope: tenant, tenant: media, rpm: 1000, tpm: 1000000}}
"""


class Stack(Replicas):
    def __init__(self, tmp: Path, redis: ClusterServer | None = None):
        super().__init__(tmp, redis=redis)
        policy = tmp / "policy.yaml"
        policy.write_text(
            POLICY.format(small=self.small.url, frontier=self.frontier.url, rpm=RPM, tpm=TPM, concurrency=CONCURRENCY)
        )
        self.start(policy)

    def key(self, tenant: str) -> str:
        r = gateway_cli(self.env, "keys", "create", "--tenant", tenant, "--label", "t", check=True)
        lines = r.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("gk_"), r.stdout
        return lines[0]


@pytest.fixture(scope="module", params=["redis"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Three replicas on one redis-server; or, for tests parametrized with ``cluster``, on the
    session's Redis Cluster (``GATEWAY_REDIS_MODE=cluster``)."""
    s = Stack(tmp_path_factory.mktemp("admission"), cluster_if_asked(request))
    yield s
    s.stop()


ON_BOTH = pytest.mark.parametrize("stack", ["redis", "cluster"], indirect=True)


def post(url: str, key: str | None, body: dict[str, object] | None = None, **headers: str) -> httpx.Response:
    h = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=body or {"model": "auto", "messages": MSG},
        headers={**h, **headers},
        timeout=30,
    )


def test_keys_are_required_and_tenant_comes_from_the_key(
    stack: Stack, sdk: Callable[[str, str], openai.OpenAI]
) -> None:
    gw = stack.gateways[0]
    r = post(gw.url, None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post(gw.url, "gk_not-a-real-key").status_code == 401
    key = stack.key("media")
    r = post(gw.url, key, **{"x-gateway-tenant": "someone-else"})  # the header is ignored
    assert r.status_code == 200 and r.headers["x-gateway-route"] == "media-route"
    assert r.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
    client = sdk(f"{gw.url}/v1", "gk_wrong")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="auto", messages=MSG)  # type: ignore[arg-type]


def test_rate_limit_is_429_and_the_sdk_raises_rate_limit_error(
    stack: Stack, sdk: Callable[[str, str], openai.OpenAI]
) -> None:
    key = stack.key("rpm-test")
    gw = stack.gateways[0]
    for _ in range(RPM):
        assert post(gw.url, key).status_code == 200
    r = post(gw.url, key)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    client = sdk(f"{gw.url}/v1", key)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="auto", messages=MSG)  # type: ignore[arg-type]


def test_revocation_reaches_every_replica_within_a_second(stack: Stack) -> None:
    key = stack.key("media")
    for gw in stack.gateways:
        assert post(gw.url, key).status_code == 200  # cached on every replica now
    listed = gateway_cli(stack.env, "keys", "list", "--tenant", "media", check=True)
    assert "gk_" not in listed.stdout  # never the secrets
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["ID", "TENANT", "LABEL", "CREATED"]
    key_id = rows[-1].split()[0]

    def used_row() -> str | None:  # replicas write "last used" at most once a second, off the request path
        listed = gateway_cli(stack.env, "keys", "list", "--tenant", "media", check=True)
        row = next(r for r in listed.stdout.splitlines() if r.startswith(key_id))
        return row if len(row.split()) == 8 else None

    row = until(used_row, what="the key's last-used time")
    fields = row.split()  # id tenant label created(date time) last-used(date time) status
    assert len(fields) == 8 and fields[-1] == "active", row
    assert fields[5] == fields[3] and fields[6] >= fields[4], row  # used today, after it was created
    gateway_cli(stack.env, "keys", "revoke", key_id, check=True)
    until(  # each replica caches a key for at most a second
        lambda: [post(gw.url, key).status_code for gw in stack.gateways] == [401, 401, 401],
        what="the revoked key refused on every replica",
    )


async def burst(stack: Stack, key: str, n: int, body: dict[str, object]) -> list[int]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:

        async def one(i: int) -> int:
            url = stack.gateways[i % 3].url
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
            return r.status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


@ON_BOTH
def test_requests_per_minute_hold_exactly_across_replicas(stack: Stack) -> None:
    for _ in range(20):
        key = stack.key("rpm-test")
        codes = asyncio.run(burst(stack, key, 3 * RPM, {"model": "auto", "messages": MSG}))
        assert codes.count(200) == RPM and codes.count(429) == 2 * RPM, codes


@ON_BOTH
def test_tokens_per_minute_hold_exactly_across_replicas(stack: Stack) -> None:
    prompt = 3 * 1 + 3 + sum(tokens.count_text(t) for t in ("user", "hello there"))  # chat framing, as counted
    per_request = 100
    body = {"model": "auto", "messages": MSG, "max_tokens": per_request - prompt}
    allowed = TPM // per_request
    for _ in range(20):
        key = stack.key("tpm-test")
        codes = asyncio.run(burst(stack, key, 3 * allowed, body))
        assert codes.count(200) == allowed and codes.count(429) == 2 * allowed, codes


@ON_BOTH
def test_concurrency_holds_exactly_across_replicas(stack: Stack) -> None:
    stack.frontier.faults(ttft_ms=1000)
    try:
        for _ in range(20):
            key = stack.key("conc-test")
            codes = asyncio.run(burst(stack, key, 3 * CONCURRENCY, {"model": "auto", "messages": MSG}))
            assert codes.count(200) == CONCURRENCY and codes.count(429) == 2 * CONCURRENCY, codes
    finally:
        stack.frontier.faults(ttft_ms=0)


def test_admin_keys_api(stack: Stack, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        POLICY.format(small=stack.small.url, frontier=stack.frontier.url, rpm=RPM, tpm=TPM, concurrency=CONCURRENCY)
    )
    gw = Gateway(policy, tmp_path, {**stack.env, "GATEWAY_ADMIN_TOKEN": "s3cret"})
    try:
        assert httpx.get(f"{gw.url}/admin/keys").status_code == 401
        assert httpx.get(f"{gw.url}/admin/keys", headers={"authorization": "Bearer nope"}).status_code == 401
        admin = {"authorization": "Bearer s3cret"}
        created = httpx.post(f"{gw.url}/admin/keys", json={"tenant": "media", "label": "api"}, headers=admin)
        assert created.status_code == 201
        secret, key_id = created.json()["key"], created.json()["id"]
        assert post(gw.url, secret).status_code == 200
        listed = httpx.get(f"{gw.url}/admin/keys", params={"tenant": "media"}, headers=admin).json()["data"]
        row = next(k for k in listed if k["id"] == key_id)
        assert row["label"] == "api" and not row["revoked"] and "key" not in row and secret not in json.dumps(listed)
        assert httpx.delete(f"{gw.url}/admin/keys/{key_id}", headers=admin).json() == {"id": key_id, "revoked": True}
        assert httpx.delete(f"{gw.url}/admin/keys/nope", headers=admin).status_code == 404
        bad = httpx.post(f"{gw.url}/admin/keys", json={"label": "x"}, headers=admin)
        assert bad.status_code == 400
    finally:
        gw.stop()
    off = Gateway(policy, tmp_path, stack.env)
    try:
        assert httpx.get(f"{off.url}/admin/keys", headers={"authorization": "Bearer x"}).status_code == 403
    finally:
        off.stop()
