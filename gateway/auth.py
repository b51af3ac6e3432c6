"""The auth stage: ``Authorization: Bearer <key>`` (or Anthropic's ``x-api-key: <key>``) →
``Principal`` (key id, tenant).

Lookups are cached per process for ``cache_ttl_s`` (1 s by default), so a revoked key stops
working on every replica within that time while a busy key costs about one Redis lookup a second.
A miss is single-flight: however many requests wait for the same key, one lookup runs and they
all take its answer (a cold cache under 1,000 concurrent requests is one lookup, not 1,000).
The cache is bounded. With ``auth: none`` in the policy (local development only) the tenant comes
from the ``x-gateway-tenant`` header instead (400 unless it is a valid tenant name, see
``keys.check_tenant``), and the gateway says so loudly at start.

If Redis does not answer, a key seen before keeps its last known tenant; an unknown key cannot be
verified and the request is refused with 503 — ``on_redis_error: fail_open`` opens rate limits,
never authentication.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import msgspec

from gateway.errors import AuthenticationFailed, InvalidRequest, StateUnavailable
from gateway.facts import DEFAULT_TENANT, TENANT_HEADER
from gateway.keys import TENANT_RULE, KeyStore, valid_tenant
from gateway.policy.schema import AuthMode, Policy
from gateway.store import CLIENT_ERRORS

NO_KEY = "none"


class Principal(msgspec.Struct, frozen=True):
    key_id: str
    tenant: str


class Authenticator:
    def __init__(
        self,
        keys: KeyStore,
        *,
        cache_ttl_s: float = 1.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.keys = keys
        self.cache_ttl_s = cache_ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._lookups: dict[str, asyncio.Task[Principal | None]] = {}  # misses being looked up, by secret
        self._used: dict[str, float] = {}  # key id -> wall time of its last request, not yet written

    async def authenticate(self, headers: Mapping[str, str], policy: Policy) -> Principal:
        if policy.auth is AuthMode.NONE:
            tenant = headers.get(TENANT_HEADER) or DEFAULT_TENANT
            if not valid_tenant(tenant):  # it becomes a metrics label and part of Redis key names
                raise InvalidRequest(f"The {TENANT_HEADER} header must be {TENANT_RULE}.", param=TENANT_HEADER)
            return Principal(NO_KEY, tenant)
        header = headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            secret = headers.get("x-api-key", "").strip()  # Anthropic's SDKs send the key this way
            if not secret:
                raise AuthenticationFailed(
                    "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
                    param=None,
                )
        # The cache is keyed by the secret as presented (it lives only in this process's memory, as
        # the request headers do): a hit costs no hashing.
        now = self._clock()
        cached = self._cache.get(secret)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            try:
                principal = await self._lookup(secret)
            except CLIENT_ERRORS:
                if cached is not None and cached[1] is not None:
                    return cached[1]  # stale, but the key was valid a moment ago
                raise StateUnavailable("The gateway cannot verify API keys right now; try again shortly.") from None
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        self._used[principal.key_id] = time.time()
        return principal

    def _lookup(self, secret: str) -> asyncio.Future[Principal | None]:
        """The lookup of ``secret`` in flight, or a new one. Waiters are shielded from each other: one
        that is cancelled (its client left) does not cancel the lookup the others wait for."""
        task = self._lookups.get(secret)
        if task is None:
            task = self._lookups[secret] = asyncio.ensure_future(self._fetch(secret))
            task.add_done_callback(lambda t: self._lookup_done(secret, t))
        return asyncio.shield(task)

    def _lookup_done(self, secret: str, task: asyncio.Task[Principal | None]) -> None:
        self._lookups.pop(secret, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _fetch(self, secret: str) -> Principal | None:
        found = await self.keys.lookup(secret)
        principal = Principal(*found) if found is not None else None
        self._cache[secret] = (self._clock() + self.cache_ttl_s, principal)
        self._cache.move_to_end(secret)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return principal

    async def write_last_used(self) -> None:
        """Record when each key was last used (`gateway keys list`): one pipelined write for all
        keys used since the last call; on a Redis error the times wait for the next call."""
        used, self._used = self._used, {}
        if not used:
            return
        try:
            await self.keys.touch_many(used)
        except CLIENT_ERRORS:
            for key_id, when in used.items():
                self._used.setdefault(key_id, when)

    async def run_last_used(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.write_last_used()
