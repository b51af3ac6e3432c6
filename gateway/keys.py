"""API keys and the tenants they belong to, kept in Redis.

A key is ``gk_`` + 43 URL-safe characters (256 random bits). Only its SHA-256 is stored — enough
for a high-entropy secret, and a leaked Redis dump reveals no usable key. The command line and
the admin API both use ``KeyStore``; both talk to Redis directly.

Redis layout (every name built here, and tested against a real Redis):

    gw:apikey:<sha256 hex>     hash  id, tenant           lookup by secret
    gw:keyinfo:<id>            hash  id, tenant, label, created, last_used, revoked
    gw:keys                    set   every key id

The three keys of one API key live in different hash slots of a Redis Cluster, so they are not
written in one transaction; writes go in an order that never leaves a usable half: ``create``
makes the lookup (which makes the secret work) last, ``revoke`` deletes it first.

Tenant names are checked here, for every way a tenant enters the gateway (``keys create``,
``POST /admin/keys``, the ``x-gateway-tenant`` header under ``auth: none``): a tenant becomes a
Prometheus label, part of Redis key names (inside ``{…}`` hash tags) and a column of the ledger,
so it is 1-64 characters of ``A-Z a-z 0-9 . _ : @ -``. A key's label is free text, at most
``LABEL_MAX`` printable characters (``keys list`` prints it in a table).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

import msgspec

from gateway.store import Client

KEYS_SET = "gw:keys"
SECRET_PREFIX = "gk_"


TENANT_MAX = 64
LABEL_MAX = 200
TENANT_RULE = f"1-{TENANT_MAX} characters of A-Z a-z 0-9 . _ : @ -"
TENANT_PATTERN = rf"^[A-Za-z0-9._:@-]{{1,{TENANT_MAX}}}$"  # also the OpenAPI description's
_TENANT = re.compile(TENANT_PATTERN)


class InvalidName(ValueError):
    """A tenant or label that breaks the rule; ``param`` names which (for the admin API's error)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 40 else f"{value[:40]!r}… ({len(value):,} characters)"


def valid_tenant(tenant: str) -> bool:
    return _TENANT.fullmatch(tenant) is not None


def check_tenant(tenant: str) -> str:
    """``tenant`` if it follows the rule, else ``InvalidName`` saying what the rule is."""
    if valid_tenant(tenant):
        return tenant
    if not tenant.strip():
        raise InvalidName("tenant must not be empty", "tenant")
    raise InvalidName(f"tenant must be {TENANT_RULE}, not {_shown(tenant)}", "tenant")


def check_label(label: str) -> str:
    if len(label) > LABEL_MAX:
        raise InvalidName(f"label must be at most {LABEL_MAX} characters, not {len(label):,}", "label")
    if not label.isprintable():
        raise InvalidName(f"label must be printable text (no newlines or control characters): {_shown(label)}", "label")
    return label


def lookup_key(secret_hash: str) -> str:
    return f"gw:apikey:{secret_hash}"


def info_key(key_id: str) -> str:
    return f"gw:keyinfo:{key_id}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyInfo(msgspec.Struct, frozen=True):
    id: str
    tenant: str
    label: str
    created: float
    last_used: float | None
    revoked: bool


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class KeyStore:
    def __init__(self, client: Client):
        self.redis = client

    async def create(self, tenant: str, label: str = "") -> tuple[str, str]:
        """A new key for ``tenant``: returns (id, secret). The secret is not stored and cannot be shown
        again. ``InvalidName`` (a ``ValueError``) if the tenant or label breaks the rule."""
        check_tenant(tenant)
        check_label(label)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        digest = hash_secret(secret)
        now = time.time()
        await self.redis.hset(
            info_key(key_id),
            mapping={"id": key_id, "tenant": tenant, "label": label, "created": repr(now), "hash": digest},
        )
        await self.redis.sadd(KEYS_SET, key_id)
        await self.redis.hset(lookup_key(digest), mapping={"id": key_id, "tenant": tenant})  # the key works from here
        return key_id, secret

    async def list(self, tenant: str | None = None) -> list[KeyInfo]:
        ids = sorted(_text(i) for i in await self.redis.smembers(KEYS_SET))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(info_key(key_id))
            rows = await pipe.execute()
        out = []
        for row in rows:
            r = {_text(k): _text(v) for k, v in row.items()}
            if not r or (tenant is not None and r["tenant"] != tenant):
                continue
            out.append(
                KeyInfo(
                    id=r["id"],
                    tenant=r["tenant"],
                    label=r.get("label", ""),
                    created=float(r["created"]),
                    last_used=float(r["last_used"]) if r.get("last_used") else None,
                    revoked=r.get("revoked") == "1",
                )
            )
        return sorted(out, key=lambda k: k.created)

    async def revoke(self, key_id: str) -> bool:
        digest = _text(await self.redis.hget(info_key(key_id), "hash"))
        if not digest:
            return False
        await self.redis.delete(lookup_key(digest))  # the key stops working here
        await self.redis.hset(info_key(key_id), "revoked", "1")
        return True

    async def lookup(self, secret: str) -> tuple[str, str] | None:
        """(key id, tenant) for a live key, or None."""
        row = await self.redis.hmget(lookup_key(hash_secret(secret)), ["id", "tenant"])
        if row[0] is None:
            return None
        return _text(row[0]), _text(row[1])

    async def touch_many(self, used: dict[str, float]) -> None:
        """Set ``last_used`` of keys that still exist (a revoked or deleted key is not re-created)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in used:
                pipe.exists(info_key(key_id))
            present = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for (key_id, when), exists in zip(used.items(), present, strict=True):
                if exists:
                    pipe.hset(info_key(key_id), "last_used", repr(when))
            await pipe.execute()
