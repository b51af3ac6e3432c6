"""``Admitter``: reserve, settle, renew and — whatever happens to a reply — release."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from gateway import crossslot
from gateway.admission.call import AdmitCall, RedisClock
from gateway.admission.gcra import Gcra
from gateway.admission.plan import Item, Kind, budget_items, plan
from gateway.admission.refusals import budget_refusal, rate_limit_headers, rejection
from gateway.auth import Principal
from gateway.batching import flush_loop
from gateway.errors import StateUnavailable, TooLargeForLimit
from gateway.facts import RequestFacts
from gateway.policy.decide import RoutingDecision
from gateway.policy.schema import Budget, Policy, RedisErrorMode
from gateway.resp import (
    REDIS_ERRORS,
    Connection,
    ConnectionLost,
    Late,
    RedisError,
    Script,
    call_script,
    encode,
    load,
    noscript,
    pipeline_script,
)
from gateway.store import lua

log = structlog.get_logger("gateway.admission")

LOCAL_SLOT_TTL_US = 600_000_000  # fail-open slots live in this process: always released, never renewed


class Admission(msgspec.Struct, frozen=True):
    reservation_id: str
    items: tuple[Item, ...]
    reserved_tokens: int
    headers: dict[str, str]
    local: bool = False  # admitted by the fail-open local limiter, not Redis
    reserved_spend: int = 0  # nano-dollars reserved against the tenant's budget


class Admitter:
    """Reserves, settles and — whatever happens to the reply — releases.

    Reservations cannot leak: a reply the caller stopped waiting for (time-out, cancellation) is
    still read, and if it admitted, the reservation is released at once (``_late``); if the
    connection drops with the outcome unknown, the request's concurrency slots are removed
    (``ZREM`` is harmless when the slot was never added). Concurrency slots live ``ttl`` (seconds,
    not minutes) and are renewed while the request is in flight (``run_renewals``), so even a
    reservation nobody can find — a gateway killed mid-request — expires within the TTL.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        timeout_s: float = 0.25,
        reservation_ttl_s: float = 5.0,
        settle_batch: int = 256,
    ):
        self.conn = conn
        self.timeout_s = timeout_s
        self.timeout_us = int(timeout_s * 1_000_000)
        self.ttl_s = reservation_ttl_s
        self.ttl_us = int(reservation_ttl_s * 1_000_000)
        self._admit = Script(lua("admit"))
        self._settle = Script(lua("settle"))
        self._renew = Script(lua("renew"))
        self._compiled: dict[tuple[str, str, str, str], AdmitCall] = {}
        self._pending: list[tuple[Admission, tuple[int, ...]]] = []
        self._live: dict[str, Admission] = {}  # Redis admissions holding concurrency slots, by id
        self._unsent: list[tuple[str, str]] = []  # slot releases (key, id) waiting for a connection
        self._renew_soon = False  # the renewal script had to be loaded: renew again at once
        conn.on_connect(self._send_unsent)
        self._wake = asyncio.Event()
        self.settle_batch = settle_batch
        self.local = Gcra()
        self.local_policy_revision = ""
        self.known_spend: dict[str, int] = {}  # budget key -> spend last read from Redis (nano-dollars)
        self.local_spend: dict[str, int] = {}  # budget key -> spend admitted locally since that read
        self.released = 0  # reservations released after their reply was lost or came too late
        self.clock = RedisClock()

    async def reserve(
        self,
        policy: Policy,
        principal: Principal,
        facts: RequestFacts,
        decision: RoutingDecision,
        rid: str,
        *,
        enforce_budget: bool = True,
    ) -> Admission:
        """Check and reserve every applicable limit and budget in one round trip; ``rid`` (the
        request id) names the reservation. A spent budget raises ``BudgetExceeded`` or
        ``BudgetDowngrade``."""
        tier = policy.tiers[decision.tier]
        out_tokens = facts.output_estimate(tier.default_max_tokens)  # n / best_of each up to max_tokens
        tokens = facts.prompt_tokens + out_tokens
        budget = policy.budgets.get(principal.tenant)
        compiled = self._compiled_for(policy, principal, decision.tier)
        if compiled.tpm_cap is not None and tokens > compiled.tpm_cap:
            raise TooLargeForLimit(
                f"This request needs {tokens} tokens (prompt + max_tokens), more than its limit of "
                f"{compiled.tpm_cap} tokens per minute can ever grant; lower max_tokens.",
                param="max_tokens",
            )
        sent_us = time.time_ns() // 1000
        deadline = self.clock.deadline(sent_us, self.timeout_us)
        extra: tuple[Item, ...] = ()
        cost = 0
        if budget is not None:
            cost = tier.price.nano(facts.prompt_tokens, out_tokens, endpoint=facts.endpoint)
            extra = budget_items(principal.tenant, budget, cost, enforce_budget, datetime.datetime.now(datetime.UTC))
        elif not compiled.items:
            return Admission(rid, (), tokens, {})
        items = compiled.items + extra if extra else compiled.items
        payload = compiled.payload(rid, tokens, deadline, extra)
        late = self._late(rid, items, tokens, cost)
        if self._unsent and self.conn.connected:
            self._send_unsent()  # releases Redis refused (loading after a restart) go ahead of this admission
        try:
            if self.conn.cluster and len(groups := crossslot.parts(items)) > 1:  # a tier-wide limit, in a cluster
                result = await self._reserve_across(groups, items, rid, tokens, cost, deadline)
            else:
                result = await self._call(payload, late)
            if result[1] == -1:
                # Run after its deadline although we still wait: our write left late (a busy loop)
                # or the clock estimate is off. Redis is answering, so ask once more, with no deadline.
                payload = compiled.payload(rid, tokens, 0, extra)
                result = await self._call(payload, late)
        except ConnectionLost as exc:
            self._release_unknown(rid, items)
            return self._without_redis(policy, principal, items, rid, tokens, cost, budget, decision, exc)
        except REDIS_ERRORS as exc:  # timed out: a late reply is handled by _late
            return self._without_redis(policy, principal, items, rid, tokens, cost, budget, decision, exc)
        self.clock.observe(result[3], sent_us)
        headers = rate_limit_headers(compiled, result)
        if not result[0]:
            item = items[result[1] - 1]
            if item.kind != Kind.BUDGET:
                raise rejection(item, result[2], headers, tokens)
            assert budget is not None
            raise budget_refusal(principal.tenant, budget, item, decision, result[2], headers)
        admission = Admission(rid, items, tokens, headers, reserved_spend=cost)
        if compiled.slots:
            self._live[rid] = admission
        return admission

    async def _reserve_across(
        self, groups: list[list[int]], items: tuple[Item, ...], rid: str, tokens: int, cost: int, deadline: int
    ) -> list[int]:
        """One admission call per hash tag, sent together: the rule (and the bound it keeps) is
        ``crossslot``'s. Parts that admitted are released when another refused or was lost."""
        parts = [tuple(items[i] for i in group) for group in groups]

        async def one(part: tuple[Item, ...]) -> list[int]:
            def payload(deadline: int) -> bytes:
                args: list[str | int] = [rid, self.ttl_us]
                for i in part:
                    args += [i.kind, i.limit, i.period_us, tokens if i.kind == "t" else i.cost]
                return encode(("EVALSHA", self._admit.sha, len(part), *(i.key for i in part), *args, deadline))

            late = self._late(rid, part, tokens, cost)
            reply: list[int] = await self._call(payload(deadline), late)
            if reply[1] == -1:  # past its deadline although we still wait: once more, with none
                reply = await self._call(payload(0), late)
            return reply

        replies = await asyncio.gather(*(one(p) for p in parts), return_exceptions=True)
        refused = any(not isinstance(r, BaseException) and not r[0] for r in replies)
        lost = [r for r in replies if isinstance(r, BaseException)]
        if refused or lost:
            for part, reply in zip(parts, replies, strict=True):
                if isinstance(reply, ConnectionLost):
                    self._release_unknown(rid, part)
                elif not isinstance(reply, BaseException) and reply[0]:
                    self.settle(
                        Admission(rid, part, tokens, {}, reserved_spend=cost), 0, 0, reached=False, release_now=True
                    )
            if not refused:
                raise lost[0]
        return crossslot.merge(replies, groups, len(items))

    async def _call(self, payload: bytes, late: Late) -> Any:
        return await call_script(self.conn, self._admit, payload, late)

    def _late(self, rid: str, items: tuple[Item, ...], tokens: int, cost: int) -> Late:
        """What to do with an admission reply nobody waited for: release what it reserved."""

        def late(reply: Any) -> None:
            if isinstance(reply, ConnectionLost):
                self._release_unknown(rid, items)
            elif isinstance(reply, list) and reply and reply[0] == 1:
                self.released += 1
                admission = Admission(rid, items, tokens, {}, reserved_spend=cost)
                self.settle(admission, 0, 0, reached=False, release_now=True)
                self._wake.set()

        return late

    def _release_unknown(self, rid: str, items: tuple[Item, ...]) -> None:
        """The connection dropped with the reservation's fate unknown: remove its concurrency slots
        (a no-op where none was added). Request and token counters are left as they are — that errs
        on the side of the limit — and refill by themselves within the limit's period."""
        slots = [i for i in items if i.kind == Kind.CONCURRENCY]
        if slots:
            self.released += 1
            for item in slots:
                self._zrem(item.key, rid)

    def _compiled_for(self, policy: Policy, principal: Principal, tier: str) -> AdmitCall:
        shape = (policy.revision, principal.tenant, principal.key_id, tier)
        compiled = self._compiled.get(shape)
        if compiled is None:
            if len(self._compiled) > 50_000:
                self._compiled.clear()
            compiled = AdmitCall(plan(policy, principal, tier, 0, self.ttl_us), self._admit.sha, self.ttl_us)
            self._compiled[shape] = compiled
        return compiled

    async def budget_used_pct(self, policy: Policy) -> dict[str, int]:
        """Each budgeted tenant's spend so far, in % of its budget (the larger of day and month).
        The spend read is also kept: with Redis away, fail_open still refuses a spent budget."""
        now = datetime.datetime.now(datetime.UTC)
        keys: list[tuple[str, str, int]] = []
        for tenant, budget in policy.budgets.items():
            for item in budget_items(tenant, budget, 0, True, now):
                keys.append((tenant, item.key, item.limit))
        if not keys:
            return {}
        replies = await self.conn.pipeline([("GET", k) for _, k, _ in keys])
        out: dict[str, int] = {}
        known: dict[str, int] = {}
        for (tenant, key, limit), used in zip(keys, replies, strict=True):
            if isinstance(used, BaseException):
                raise used
            known[key] = int(used or 0)
            pct = int(known[key] * 100 // limit)
            out[tenant] = max(out.get(tenant, 0), pct)
        self.known_spend, self.local_spend = known, {}
        return out

    def _without_redis(
        self,
        policy: Policy,
        principal: Principal,
        items: tuple[Item, ...],
        rid: str,
        tokens: int,
        cost: int,
        budget: Budget | None,
        decision: RoutingDecision,
        exc: BaseException,
    ) -> Admission:
        """Redis did not answer in time. fail_closed: 503. fail_open: rate limits against a local
        share (limit ÷ expected_replicas), and budgets against the spend last read from Redis plus
        what this process admitted since — a tenant known to be over budget stays refused."""
        if policy.on_redis_error is RedisErrorMode.FAIL_CLOSED:
            log.error("admission_redis_unavailable", request_id=rid, error=repr(exc), mode="fail_closed")
            raise StateUnavailable("Rate limits cannot be checked right now; try again shortly.") from None
        if policy.revision != self.local_policy_revision:
            self.local, self.local_policy_revision = Gcra(), policy.revision
        share = policy.expected_replicas
        for item in items:
            if item.kind == Kind.BUDGET and item.limit < 2**52:  # enforced (not a downgraded request's count)
                used = self.known_spend.get(item.key, 0) + self.local_spend.get(item.key, 0)
                if used + item.cost > item.limit:
                    assert budget is not None
                    log.warning(
                        "rejected_without_redis", request_id=rid, error=repr(exc), mode="fail_open", limit="budget"
                    )
                    raise budget_refusal(principal.tenant, budget, item, decision, 1_000_000, {})
        local_items = tuple(
            msgspec.structs.replace(
                i,
                limit=max(1, i.limit // share),
                key="local:" + i.key,
                cost=tokens if i.kind == Kind.TOKENS else i.cost,
            )
            for i in items
            if i.kind != Kind.BUDGET
        )
        ok, failing = self.local.admit(local_items, rid, LOCAL_SLOT_TTL_US)
        log.warning(
            "admitted_without_redis" if ok else "rejected_without_redis",
            request_id=rid,
            error=repr(exc),
            mode="fail_open",
        )
        if not ok:
            item = local_items[failing - 1]
            raise rejection(item, int(item.emission_us * item.cost), {}, tokens)
        for item in items:
            if item.kind == Kind.BUDGET:
                self.local_spend[item.key] = self.local_spend.get(item.key, 0) + item.cost
        return Admission(rid, local_items, tokens, {}, local=True)

    def settle(
        self,
        admission: Admission,
        used_tokens: int | None,
        used_spend: int | None = None,
        *,
        reached: bool = True,
        release_now: bool = False,
    ) -> None:
        """Queue the give-back: ``used_tokens``/``used_spend`` None keeps the whole reservation
        (usage unknown). A request that never ``reached`` a worker gives back everything, its
        request count included: a refusal after admission (no healthy worker) costs no quota."""
        held = self._live.pop(admission.reservation_id, None) is not None or release_now
        if not admission.items:
            return
        refund_tokens = 0 if used_tokens is None else admission.reserved_tokens - used_tokens
        refund_spend = 0 if used_spend is None else admission.reserved_spend - used_spend
        refunds = tuple(
            refund_tokens
            if i.kind == Kind.TOKENS
            else refund_spend
            if i.kind == Kind.BUDGET
            else (i.cost if i.kind == Kind.REQUESTS and not reached else 0)
            for i in admission.items
        )
        if admission.local:
            self.local.settle(admission.items, admission.reservation_id, refunds)
            return
        if held:
            self._release_now(admission)
            # the slots are on their way: the batch carries only the refunds
            kept = [(i, r) for i, r in zip(admission.items, refunds, strict=True) if i.kind != Kind.CONCURRENCY]
            admission = msgspec.structs.replace(admission, items=tuple(i for i, _ in kept))
            refunds = tuple(r for _, r in kept)
            if not any(refunds):
                return
        self._pending.append((admission, refunds))
        if len(self._pending) >= self.settle_batch:
            self._wake.set()

    def _release_now(self, admission: Admission) -> None:
        """Release a request's concurrency slots right away (``ZREM``, no reply awaited), not with
        the next batch: the client's next request comes within a round trip and must not find the
        slot of the one it just finished still held (that was a false 429 at a load below the
        limit). A release that cannot go out now (not connected, connection lost) waits in
        ``_unsent`` and is sent first on the next connection, ahead of any admission."""
        for item in admission.items:
            if item.kind == Kind.CONCURRENCY:
                self._zrem(item.key, admission.reservation_id)

    def _zrem(self, key: str, rid: str) -> None:
        fut = self.conn.send_nowait(encode(("ZREM", key, rid)), self._retry_release(key, rid))
        if fut is None:
            self._unsent.append((key, rid))
        else:
            fut.add_done_callback(self._released(key, rid))

    def _send_unsent(self) -> None:
        """Called as a connection is made, before anything else is sent on it."""
        unsent, self._unsent = self._unsent[-100_000:], []  # bounded; slots also expire by themselves
        for key, rid in unsent:
            self._zrem(key, rid)

    def _released(self, key: str, rid: str) -> Callable[[asyncio.Future[Any]], None]:
        def done(fut: asyncio.Future[Any]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            # an error (LOADING while Redis restarts, the connection lost) means not done: again;
            # a time-out is not an answer — the late reply goes to _retry_release
            if isinstance(exc, RedisError):
                self._unsent.append((key, rid))

        return done

    def _retry_release(self, key: str, rid: str) -> Late:
        def late(reply: Any) -> None:
            if isinstance(reply, RedisError):
                self._unsent.append((key, rid))

        return late

    async def flush(self) -> int:
        """Send the queued settlements in one pipelined round trip; keep them if Redis is away.
        Slot releases that failed (Redis loading after a restart, say) are sent again first."""
        if self._unsent and self.conn.connected:
            self._send_unsent()
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        # Only what changes state — concurrency slots, and reservations that were off — grouped by
        # hash tag, so one script call settles a whole tenant's (or tier's) share of the batch.
        groups: dict[str, tuple[list[str], list[str | float | int]]] = {}
        for admission, refunds in batch:
            for item, refund in zip(admission.items, refunds, strict=True):
                if item.kind == Kind.CONCURRENCY or refund:
                    tag = item.key[: item.key.index("}") + 1]
                    keys, args = groups.setdefault(tag, ([], []))
                    keys.append(item.key)
                    args += [admission.reservation_id, item.kind, item.emission_us, refund]
        if not groups:
            return len(batch)
        commands = [("EVALSHA", self._settle.sha, len(keys), *keys, *args) for keys, args in groups.values()]
        try:
            await self._pipeline(commands, self._settle, "settlement")
        except REDIS_ERRORS as exc:
            self._pending[:0] = batch[-100_000:]  # retried on the next flush; slots also expire by themselves
            log.warning("settle_deferred", pending=len(self._pending), error=repr(exc))
            return 0
        return len(batch)

    async def _pipeline(self, commands: list[tuple[str | float | int, ...]], script: Script, what: str) -> None:
        # NOSCRIPT after a Redis restart, or a connection lost part-way: load and resend (settling is idempotent)
        replies = await pipeline_script(self.conn, script, commands, resend=_failed)
        failed = [r for r in replies if isinstance(r, BaseException)]
        if failed:
            raise RedisError(f"{what} failed: {failed[0]}")

    async def renew(self) -> int:
        """Extend the concurrency slots of requests still in flight by one TTL, re-adding any that
        a long stall or a restart dropped (a request settled meanwhile has left ``_live``, and its
        release goes out after this renewal). Returns how many slots were renewed."""
        groups: dict[str, tuple[list[str], list[str]]] = {}
        for admission in list(self._live.values()):
            for item in admission.items:
                if item.kind == Kind.CONCURRENCY:
                    tag = item.key[: item.key.index("}") + 1]
                    keys, rids = groups.setdefault(tag, ([], []))
                    keys.append(item.key)
                    rids.append(admission.reservation_id)
        if not groups:
            return 0
        commands: list[tuple[str | float | int, ...]] = [
            ("EVALSHA", self._renew.sha, len(keys), *keys, self.ttl_us, *rids) for keys, rids in groups.values()
        ]
        try:
            replies = await self.conn.pipeline(commands)
        except REDIS_ERRORS as exc:
            replies = [exc]
        failed = [r for r in replies if isinstance(r, BaseException)]
        if failed:
            # Never resend these commands later: a request may end meanwhile, and a renewal sent
            # after its release would bring the slot back. The next round rebuilds from _live.
            if any(noscript(r) for r in failed):
                with contextlib.suppress(*REDIS_ERRORS):
                    await load(self.conn, self._renew)
                    self._renew_soon = True
            log.warning("renew_failed", slots=sum(len(k) for k, _ in groups.values()), error=repr(failed[0]))
            return 0
        return sum(len(k) for k, _ in groups.values())

    async def run_renewals(self) -> None:
        """Renew in-flight slots three times per TTL, so one missed renewal loses nothing."""
        while True:
            await asyncio.sleep(0 if self._renew_soon else self.ttl_s / 3)
            self._renew_soon = False
            await self.renew()

    async def run_settler(self, interval_s: float = 0.01) -> None:
        await flush_loop(self._wake, self.flush, interval_s)


def _failed(reply: Any) -> bool:
    return isinstance(reply, BaseException)
