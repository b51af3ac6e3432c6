"""Policy versions in Redis: apply, history, diff, rollback — and how replicas hear of a change.

``apply`` validates first (an invalid policy changes nothing anywhere), then one script
(``lua/policy_apply.lua``) stores the version, makes it active, appends an audit entry (who, when,
from which version to which, the diff) and publishes the new number on ``gw:policy:changed``.

Redis layout (one hash tag, ``{policy}``: the script's keys share a Redis Cluster slot):

    gw:{policy}:seq        string  last version number
    gw:{policy}:versions   hash    version -> JSON {version, previous, sha256, yaml, author, time, message, source}
    gw:{policy}:active     string  active version number
    gw:{policy}:audit      stream  one entry per change: version, previous, author, message, time, diff
    gw:policy:changed      pub/sub channel: the new version number (a cluster sends it to every node)

Versions stored before the hash tag (``gw:policy:seq`` …, one Redis only) are renamed on first use.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import time

import msgspec
import redis.asyncio as aioredis

from gateway.policy.load import parse
from gateway.policy.schema import Policy
from gateway.store import Client, script

SEQ = "gw:{policy}:seq"
VERSIONS = "gw:{policy}:versions"
ACTIVE = "gw:{policy}:active"
AUDIT = "gw:{policy}:audit"
CHANNEL = "gw:policy:changed"
_LEGACY = ("gw:policy:seq", "gw:policy:versions", "gw:policy:active", "gw:policy:audit")


class Version(msgspec.Struct, frozen=True):
    version: int
    previous: int
    sha256: str
    yaml: str
    author: str
    time: float
    message: str
    source: str

    def policy(self) -> Policy:
        return parse(self.yaml, f"{self.source} (v{self.version})", revision=f"v{self.version}")


class AuditEntry(msgspec.Struct, frozen=True):
    id: str
    version: int
    previous: int
    author: str
    message: str
    time: float
    diff: str


def _diff(old: str, new: str, old_name: str, new_name: str) -> str:
    lines = difflib.unified_diff(old.splitlines(True), new.splitlines(True), old_name, new_name)
    return "".join(lines)


class PolicyStore:
    def __init__(self, client: Client):
        self.redis = client
        self._apply = script(client, "policy_apply")
        self._migrate = script(client, "policy_migrate")
        self._migrated = isinstance(client, aioredis.RedisCluster)  # a cluster never held the old names

    async def active(self) -> Version | None:
        if not self._migrated:
            await self._migrate(keys=[*_LEGACY, SEQ, VERSIONS, ACTIVE, AUDIT])
            self._migrated = True
        number = await self.redis.get(ACTIVE)
        return await self.get(int(number)) if number is not None else None

    async def get(self, version: int) -> Version | None:
        raw = await self.redis.hget(VERSIONS, str(version))
        return msgspec.json.decode(raw, type=Version) if raw is not None else None

    async def history(self) -> list[Version]:
        rows = await self.redis.hgetall(VERSIONS)
        return sorted((msgspec.json.decode(v, type=Version) for v in rows.values()), key=lambda v: v.version)

    async def audit(self) -> list[AuditEntry]:
        out = []
        rows: list[tuple[bytes, dict[bytes, bytes]]] = await self.redis.xrange(AUDIT)  # type: ignore[assignment]
        for entry_id, fields in rows:
            f = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(
                AuditEntry(
                    entry_id.decode(),
                    int(f["version"]),
                    int(f["previous"]),
                    f["author"],
                    f["message"],
                    float(f["time"]),
                    f["diff"],
                )
            )
        return out

    async def apply(self, text: str, *, source: str, author: str, message: str = "") -> tuple[Version, bool]:
        """Validate and store ``text`` as the new active version. Returns (version, changed):
        applying the text that is already active changes nothing. Raises ``PolicyError``."""
        # every problem, FILE:LINE, before anything is written; off the event loop, which keeps serving
        await asyncio.to_thread(parse, text, source)
        sha = hashlib.sha256(text.encode()).hexdigest()
        current = await self.active()
        if current is not None and current.sha256 == sha:
            return current, False
        now = time.time()
        record = {"sha256": sha, "yaml": text, "author": author, "time": now, "message": message, "source": source}
        diff = _diff(current.yaml if current else "", text, f"v{current.version}" if current else "(none)", "new")
        version, _ = await self._apply(
            keys=[SEQ, VERSIONS, ACTIVE, AUDIT],
            args=[msgspec.json.encode(record), diff, author, message, repr(now), CHANNEL],
        )
        stored = await self.get(int(version))
        assert stored is not None
        return stored, True

    async def rollback(self, version: int, *, author: str) -> Version:
        old = await self.get(version)
        if old is None:
            raise KeyError(version)
        new, _ = await self.apply(old.yaml, source=old.source, author=author, message=f"rollback to v{version}")
        return new

    async def diff(self, a: int, b: int) -> str:
        va, vb = await self.get(a), await self.get(b)
        if va is None or vb is None:
            raise KeyError(a if va is None else b)
        return _diff(va.yaml, vb.yaml, f"v{a}", f"v{b}")
