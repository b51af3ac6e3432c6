"""Tenant names and key labels: one rule, checked wherever a tenant enters the gateway (the
admin API and the header under ``auth: none`` are held in tests/e2e/test_hostile.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway import store
from gateway.keys import InvalidName, KeyStore, check_label, check_tenant
from tests.procs import gateway_cli


@pytest.mark.parametrize("tenant", ["media", "t", "acme-corp", "team_1", "org:eu.west", "ops@acme", "x" * 64])
def test_ordinary_tenant_names_are_accepted(tenant: str) -> None:
    assert check_tenant(tenant) == tenant


@pytest.mark.parametrize(
    ("tenant", "says"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("x" * 65, "(65 characters)"),
        ("t" * 500_000, "(500,000 characters)"),  # the message quotes a prefix, not the name
        ("a\nb", "not 'a\\nb'"),
        ("a}{b", "not 'a}{b'"),  # would break out of a Redis hash tag
        ("a b", "1-64 characters of A-Z a-z 0-9 . _ : @ -"),
        ("tenant*", "1-64 characters"),
        ("müller", "1-64 characters"),
    ],
)
def test_tenant_names_outside_the_rule_are_refused(tenant: str, says: str) -> None:
    with pytest.raises(InvalidName) as info:
        check_tenant(tenant)
    assert says in str(info.value) and info.value.param == "tenant"
    assert len(str(info.value)) < 200


def test_labels_are_bounded_printable_text() -> None:
    assert check_label("") == "" and check_label("CI key — prod, rotated 2026") == "CI key — prod, rotated 2026"
    for label, says in (("x" * 201, "at most 200 characters, not 201"), ("a\nb", "no newlines")):
        with pytest.raises(InvalidName) as info:
            check_label(label)
        assert says in str(info.value) and info.value.param == "label"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = store.connect(redis_url)
    await c.flushdb()
    yield c
    await c.aclose()


async def test_a_refused_key_writes_nothing(client: aioredis.Redis) -> None:
    keys = KeyStore(client)
    for tenant, label in (("a}{b", ""), ("ok", "x" * 1000)):
        with pytest.raises(InvalidName):  # a ValueError, as the CLI expects
            await keys.create(tenant, label)
    assert await client.dbsize() == 0
    key_id, _ = await keys.create("ops@acme", "deploy bot")
    assert [(k.id, k.tenant, k.label) for k in await keys.list()] == [(key_id, "ops@acme", "deploy bot")]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tenant", "a\nb"], "tenant must be 1-64 characters"),
        (["--tenant", "t" * 100_000], "(100,000 characters)"),
        (["--tenant", "t", "--label", "x" * 300], "label must be at most 200"),
    ],
)
def test_keys_create_refuses_a_bad_name_with_exit_2(args: list[str], says: str) -> None:
    # Redis is unreachable on purpose: the name is checked before anything is sent
    done = gateway_cli({"GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0"}, "keys", "create", *args)
    assert done.returncode == 2
    assert says in done.stderr and "cannot reach Redis" not in done.stderr
    assert done.stdout == ""
