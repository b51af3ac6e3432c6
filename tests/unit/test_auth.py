"""Key lookups against a real redis-server: cached, and single-flight on a miss."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway import store
from gateway.auth import Authenticator, Principal
from gateway.errors import AuthenticationFailed, StateUnavailable
from gateway.keys import KeyStore
from gateway.policy.load import parse
from gateway.policy.schema import Policy
from tests.procs import free_port

POLICY = parse(
    """version: 1
tiers:
  t: {model: m, workers: [{url: "http://127.0.0.1:1"}], price: {input: 1, output: 1}}
routes:
  - {name: default, tier: t}
""",
    "policy.yaml",
)


class CountingKeys(KeyStore):
    """The real key store, counting the lookups that reach Redis."""

    def __init__(self, client: aioredis.Redis):
        super().__init__(client)
        self.lookups = 0

    async def lookup(self, secret: str) -> tuple[str, str] | None:
        self.lookups += 1
        return await super().lookup(secret)


@pytest.fixture
async def keys(redis_url: str) -> AsyncIterator[CountingKeys]:
    client = store.connect(redis_url)
    yield CountingKeys(client)
    await client.aclose()


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def concurrently(auth: Authenticator, secret: str, n: int, policy: Policy = POLICY) -> list[object]:
    return await asyncio.gather(*(auth.authenticate(bearer(secret), policy) for _ in range(n)), return_exceptions=True)


async def test_a_cold_cache_under_1000_concurrent_requests_is_one_lookup(keys: CountingKeys) -> None:
    key_id, secret = await keys.create("media")
    now = [0.0]
    auth = Authenticator(keys, cache_ttl_s=1.0, clock=lambda: now[0])
    results = await concurrently(auth, secret, 1000)
    assert results == [Principal(key_id, "media")] * 1000
    assert keys.lookups == 1
    await concurrently(auth, secret, 100)
    assert keys.lookups == 1  # cached
    now[0] = 1.5  # the entry expired: the next burst is again one lookup
    assert (await concurrently(auth, secret, 1000)).count(Principal(key_id, "media")) == 1000
    assert keys.lookups == 2


async def test_an_unknown_key_is_one_lookup_and_every_waiter_gets_401(keys: CountingKeys) -> None:
    auth = Authenticator(keys)
    results = await concurrently(auth, "gk_unknown", 500)
    assert all(isinstance(r, AuthenticationFailed) for r in results)
    assert keys.lookups == 1


async def test_redis_away_is_one_lookup_and_503_for_every_waiter() -> None:
    client = store.connect(f"redis://127.0.0.1:{free_port()}/0")
    keys = CountingKeys(client)
    try:
        results = await concurrently(Authenticator(keys), "gk_anything", 500)
        assert all(isinstance(r, StateUnavailable) for r in results)
        assert keys.lookups == 1
    finally:
        await client.aclose()


async def test_a_cancelled_waiter_does_not_cancel_the_lookup_of_the_others(keys: CountingKeys) -> None:
    key_id, secret = await keys.create("media")
    auth = Authenticator(keys)
    first = asyncio.ensure_future(auth.authenticate(bearer(secret), POLICY))
    others = [asyncio.ensure_future(auth.authenticate(bearer(secret), POLICY)) for _ in range(10)]
    await asyncio.sleep(0)
    first.cancel()  # the client that started the lookup left
    assert await asyncio.gather(*others) == [Principal(key_id, "media")] * 10
    assert keys.lookups == 1
    with pytest.raises(asyncio.CancelledError):
        await first
