"""Changing the policy of a running replica without a restart.

``PolicyFollower`` keeps a replica on the active version in Redis: it listens on the
``gw:policy:changed`` channel and, as a safety net for a missed message or a reconnect, checks the
active version number every ``poll_s``. ``watch_file`` reloads a local file when its content
changes (mounted config maps, git checkouts), with the same validation; an invalid edit is logged
with every ``FILE:LINE`` problem and the last good version keeps serving.

Either way the swap is one reference assignment in ``Runtime``: a request in flight keeps the
snapshot it started with, so every request is served entirely under one version.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
import structlog

from gateway.policy.load import PolicyError, parse
from gateway.policy.schema import Policy
from gateway.policy.store import ACTIVE, CHANNEL, PolicyStore
from gateway.resp import REDIS_ERRORS
from gateway.store import CLIENT_ERRORS

log = structlog.get_logger("gateway.policy")


async def startup_policy(file_policy: Policy, store: PolicyStore) -> Policy:
    """The file's policy — unless Redis holds an applied version, which wins (and we say so)."""
    try:
        async with asyncio.timeout(2):
            active = await store.active()
    except CLIENT_ERRORS as exc:
        log.warning("policy_store_unreachable", error=repr(exc), using=file_policy.source)
        return file_policy
    if active is None:
        return file_policy
    if active.sha256 == file_policy.sha256:
        return active.policy()
    log.warning(
        "policy_from_redis",
        message=f"Redis holds applied policy v{active.version}; serving it instead of {file_policy.source}",
        version=active.version,
        file=file_policy.source,
    )
    return active.policy()


Current = Callable[[], Policy]
"""The policy in effect now (the app reads its runtime's)."""
Swap = Callable[[Policy], None]
"""Put a policy in effect: the one reference swap requests read (``Runtime.swap_policy``)."""


class PolicyFollower:
    """Follows the active version in Redis: at once on its pub/sub announcement, else every ``poll_s``."""

    def __init__(
        self,
        current: Current,
        swap: Swap,
        store: PolicyStore,
        listener: Callable[[], aioredis.Redis],
        poll_s: float = 0.5,
    ):
        self.current = current
        self.swap = swap
        self.store = store
        # a connection of its own (a subscribed connection can do nothing else), made afresh at each
        # reconnect: in a cluster, on another node
        self.listener = listener
        self.poll_s = poll_s

    def _current(self) -> int:
        rev = self.current().revision
        return int(rev[1:]) if rev.startswith("v") and rev[1:].isdigit() else 0

    async def check(self) -> None:
        number = await self.store.redis.get(ACTIVE)
        if number is None or int(number) == self._current():
            return
        version = await self.store.get(int(number))
        if version is None:
            return
        try:
            policy = await asyncio.to_thread(version.policy)  # off the loop: requests keep flowing
        except PolicyError as exc:  # stored versions were validated on apply; this guards a code downgrade
            log.error("policy_version_invalid", version=version.version, problems=exc.problems)
            return
        old = self.current().revision
        self.swap(policy)
        log.info("policy_swapped", old=old, new=policy.revision, author=version.author, message=version.message)

    async def run(self) -> None:
        while True:
            listener = self.listener()
            pubsub = listener.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                while True:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll_s)
                    _raise_if_cancelling()
                    await self.check()  # on a message at once, else every poll_s
            except CLIENT_ERRORS as exc:
                _raise_if_cancelling()
                log.warning("policy_follower_reconnecting", error=repr(exc))
                for _ in range(2):  # the poll goes on meanwhile (through the store's own connection)
                    with contextlib.suppress(*REDIS_ERRORS):
                        await self.check()
                    await asyncio.sleep(self.poll_s)
            finally:
                with contextlib.suppress(*CLIENT_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await listener.aclose()


def _raise_if_cancelling() -> None:
    """redis-py can swallow a cancellation: one that lands as a read's own time-out fires comes back
    as "no message" from ``get_message`` (or as a Redis TimeoutError), and the loop went on forever —
    shutdown waited on it (1 SIGTERM in 31). So the loop asks the task itself after each call."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def watch_file(current: Current, swap: Swap, path: str, interval_s: float = 0.5) -> None:
    p = Path(path)

    def read() -> bytes:  # a small file, read off the loop
        return p.read_bytes()

    last = hashlib.sha256(await asyncio.to_thread(read)).hexdigest()
    while True:
        await asyncio.sleep(interval_s)
        try:
            data = await asyncio.to_thread(read)
        except OSError as exc:
            log.warning("policy_file_unreadable", path=path, error=repr(exc))
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha == last:
            continue
        last = sha
        try:
            policy = await asyncio.to_thread(parse, data.decode("utf-8", errors="replace"), path)
        except PolicyError as exc:
            log.error("policy_reload_refused", path=path, problems=exc.problems, keeping=current().revision)
            continue
        old = current().revision
        swap(policy)
        log.info("policy_reloaded", path=path, old=old, new=policy.revision)
