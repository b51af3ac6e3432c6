"""The admission stage: rate limits that hold exactly across gateway replicas.

Every applicable limit of ``policy.limits`` becomes one or more *items* — requests per minute,
tokens per minute, concurrent requests — each with its own Redis key. ``reserve`` checks and
reserves all of a request's items in ONE round trip (``lua/admit.lua``: atomic, on Redis's clock),
reserving tokens up front: the prompt estimate plus ``max_tokens`` (or the tier's
``default_max_tokens``). ``settle`` gives back what the request did not use — queued and sent in
batches off the client's path (``lua/settle.lua``). Concurrency slots and reservations expire by
themselves, so a gateway killed mid-request cannot hold capacity for ever.

The algorithm is GCRA (a token bucket kept as one timestamp): exact for weighted costs such as
tokens, O(1) per item, and with no window boundary that could let twice the limit through.

Key names, one hash tag per tenant (or per tier for tier-wide limits) so that a tenant's keys
share a Redis Cluster slot:

    gw:{t:<tenant>}:rl:<limit#>:key:<key id>:<r|t|c>      scope: key
    gw:{t:<tenant>}:rl:<limit#>:tenant:<r|t|c>            scope: tenant
    gw:{t:<tenant>}:rl:<limit#>:tier:<tier>:<r|t|c>       scope: tenant+tier
    gw:{tier:<tier>}:rl:<limit#>:<r|t|c>                  scope: tier

When Redis does not answer within its time-out, ``on_redis_error`` decides: ``fail_closed``
refuses with 503; ``fail_open`` admits against a per-process limiter of limit ÷
``expected_replicas`` and logs every such admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import re
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Literal

import msgspec
import structlog

from gateway import crossslot
from gateway.auth import Principal
from gateway.batching import flush_loop
from gateway.errors import BudgetExceeded, RateLimited, StateUnavailable, TooLargeForLimit
from gateway.facts import RequestFacts
from gateway.policy.decide import RoutingDecision
from gateway.policy.schema import BUDGET_UNIT, Budget, Limit, Policy, RedisErrorMode, Scope
from gateway.resp import Connection, ConnectionLost, Late, RedisError, Script, encode
from gateway.store import lua

log = structlog.get_logger("gateway.admission")

Kind = Literal["r", "t", "c", "b"]
MINUTE_US = 60_000_000
REDIS_ERRORS = (RedisError, OSError, TimeoutError)
LOCAL_SLOT_TTL_US = 600_000_000  # fail-open slots live in this process: always released, never renewed


class Item(msgspec.Struct, frozen=True):
    kind: Kind
    key: str
    limit: int
    period_us: int
    cost: int
    scope: str = ""  # the limit's scope, for metrics

    @property
    def emission_us(self) -> float:
        return self.period_us / self.limit


class Admission(msgspec.Struct, frozen=True):
    reservation_id: str
    items: tuple[Item, ...]
    reserved_tokens: int
    headers: dict[str, str]
    local: bool = False  # admitted by the fail-open local limiter, not Redis
    reserved_spend: int = 0  # nano-dollars reserved against the tenant's budget


class BudgetDowngrade(Exception):
    """The tenant's budget is spent and its action is to route to a cheaper tier."""

    def __init__(self, tier: str):
        super().__init__(tier)
        self.tier = tier


def spend(
    price_in: Decimal,
    price_out: Decimal,
    prompt: int,
    completion: int,
    cached: int = 0,
    price_cached: Decimal | None = None,
) -> int:
    """Cost in whole nano-dollars, rounded up (a budget errs on the side of the budget); ``cached`` of
    the prompt tokens at ``price_cached`` when the tier has one."""
    billed_in = price_in * prompt
    if price_cached is not None and cached:
        billed_in = price_in * (prompt - cached) + price_cached * cached
    return math.ceil((billed_in + price_out * completion) * (BUDGET_UNIT // 1_000_000))


def budget_items(tenant: str, budget: Budget, cost: int, enforce: bool, now: datetime.datetime) -> tuple[Item, ...]:
    """The day's and month's spend counters of ``tenant``; with ``enforce`` off they only count."""
    tag = _tag(tenant)
    tomorrow = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    next_month = (now.replace(day=28) + datetime.timedelta(days=4)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    out = []
    for limit, key, ends in (
        (budget.daily, f"gw:{{t:{tag}}}:budget:day:{now:%Y-%m-%d}", tomorrow),
        (budget.monthly, f"gw:{{t:{tag}}}:budget:month:{now:%Y-%m}", next_month),
    ):
        if limit is not None:
            period = int((ends - now).total_seconds() * 1_000_000)
            out.append(Item("b", key, limit if enforce else 2**52, period, cost, "budget"))
    return tuple(out)


_UNSAFE = re.compile(r"[{}\s]")


def _tag(value: str) -> str:
    return _UNSAFE.sub("_", value)


def applies(limit: Limit, principal: Principal, tier: str) -> bool:
    if limit.tenant is not None and limit.tenant != principal.tenant:
        return False
    return not (limit.tier is not None and limit.tier != tier)


def plan(policy: Policy, principal: Principal, tier: str, tokens: int, ttl_us: int) -> tuple[Item, ...]:
    """The items a request must pass: a pure function of the policy and the request."""
    items: list[Item] = []
    tenant = _tag(principal.tenant)
    for lim in policy.limits:
        if not applies(lim, principal, tier):
            continue
        if lim.scope is Scope.KEY:
            base = f"gw:{{t:{tenant}}}:rl:{lim.index}:key:{_tag(principal.key_id)}"
        elif lim.scope is Scope.TENANT:
            base = f"gw:{{t:{tenant}}}:rl:{lim.index}:tenant"
        elif lim.scope is Scope.TENANT_TIER:
            base = f"gw:{{t:{tenant}}}:rl:{lim.index}:tier:{_tag(tier)}"
        else:
            base = f"gw:{{tier:{_tag(tier)}}}:rl:{lim.index}"
        scope = lim.scope.value
        if lim.rpm is not None:
            items.append(Item("r", f"{base}:r", lim.rpm, MINUTE_US, 1, scope))
        if lim.tpm is not None:
            items.append(Item("t", f"{base}:t", lim.tpm, MINUTE_US, tokens, scope))
        if lim.concurrency is not None:
            items.append(Item("c", f"{base}:c", lim.concurrency, ttl_us, 1, scope))
    return tuple(items)


def duration(us: float) -> str:
    """OpenAI's style for reset times: 20ms, 1.5s, 6m0s."""
    if us < 1_000_000:
        return f"{max(us, 0) / 1000:.0f}ms"
    s = us / 1_000_000
    if s < 60:
        return f"{s:.3g}s"
    return f"{int(s // 60)}m{int(s % 60)}s"


class Gcra:
    """The same algorithm as the scripts, in process: the fail-open limiter, and the tests' model."""

    def __init__(self, clock: Callable[[], int] = lambda: time.time_ns() // 1000):
        self.clock = clock
        self.tat: dict[str, int] = {}
        self.slots: dict[str, dict[str, int]] = {}

    def admit(self, items: tuple[Item, ...], rid: str, ttl_us: int, now: int | None = None) -> tuple[bool, int]:
        now = self.clock() if now is None else now
        new: dict[str, int] = {}
        for i, item in enumerate(items):
            if item.kind == "c":
                slots = {k: v for k, v in self.slots.get(item.key, {}).items() if v > now}
                self.slots[item.key] = slots
                if len(slots) + item.cost > item.limit:
                    return False, i + 1
            else:
                tat = max(self.tat.get(item.key, now), now)
                new_tat = tat + math.ceil(item.cost * item.emission_us)
                if new_tat - now > item.period_us:
                    return False, i + 1
                new[item.key] = new_tat
        for item in items:
            if item.kind == "c":
                self.slots[item.key][rid] = now + ttl_us
            else:
                self.tat[item.key] = new[item.key]
        return True, 0

    def settle(self, items: tuple[Item, ...], rid: str, refunds: tuple[int, ...], now: int | None = None) -> None:
        now = self.clock() if now is None else now
        for item, refund in zip(items, refunds, strict=True):
            if item.kind == "c":
                self.slots.get(item.key, {}).pop(rid, None)
            elif refund:
                tat = max(self.tat.get(item.key, now), now)
                self.tat[item.key] = max(tat - math.floor(refund * item.emission_us), now)


def _bulk(value: str | int) -> bytes:
    b = str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


class _Compiled:
    """A request shape's admission call, encoded once: items, and the RESP bytes of EVALSHA with
    holes for what changes per request (the reservation id and the token cost)."""

    __slots__ = ("head", "items", "requests", "slots", "tail", "token_slots", "tokens", "tpm_cap")

    def __init__(self, items: tuple[Item, ...], sha: str, ttl_us: int):
        self.items = items  # token items carry cost 0 here: the cost is the Admission's reserved_tokens
        self.requests = [i for i, item in enumerate(items) if item.kind == "r"]
        self.tokens = [i for i, item in enumerate(items) if item.kind == "t"]
        self.slots = any(item.kind == "c" for item in items)
        # the most tokens one request can ever be granted: the smallest tokens-per-minute limit
        self.tpm_cap = min((item.limit for item in items if item.kind == "t"), default=None)
        n_args = 3 + len(items) + 2 + 4 * len(items) + 1
        self.head = b"*%d\r\n" % n_args + _bulk("EVALSHA") + _bulk(sha) + _bulk(len(items))
        self.head += b"".join(_bulk(i.key) for i in items)
        # after the reservation id: ttl, then kind, limit, period, cost per item
        self.tail: list[bytes] = [_bulk(ttl_us)]
        self.token_slots: list[int] = []
        for item in items:
            self.tail.append(_bulk(item.kind) + _bulk(item.limit) + _bulk(item.period_us))
            if item.kind == "t":
                self.token_slots.append(len(self.tail))
                self.tail.append(b"")
            else:
                self.tail.append(_bulk(item.cost))

    def payload(self, rid: str, tokens: int, deadline_us: int) -> bytes:
        parts = self.tail.copy()
        cost = _bulk(tokens)
        for i in self.token_slots:
            parts[i] = cost
        return self.head + _bulk(rid) + b"".join(parts) + _bulk(deadline_us)


class RedisClock:
    """This process's clock translated to Redis's, for admission deadlines.

    Each admission reply carries Redis's time when the script ran; minus our time when the call
    was sent, that is the clock offset plus the call's delay, never less than the offset. The
    smallest such sample over the last minute or two is therefore a slight over-estimate, which errs
    towards a later deadline: an admission is never refused for a wrong clock, at worst a late one
    reserves and is released by its late reply."""

    WINDOW_US = 60_000_000

    def __init__(self) -> None:
        self.best: int | None = None  # smallest sample of this window
        self.previous: int | None = None  # of the window before
        self.window_ends = 0

    def observe(self, redis_now_us: int, sent_us: int) -> None:
        sample = redis_now_us - sent_us
        if sent_us > self.window_ends:
            self.previous, self.best, self.window_ends = self.best, None, sent_us + self.WINDOW_US
        if self.best is None or sample < self.best:
            self.best = sample

    def deadline(self, sent_us: int, timeout_us: int) -> int:
        """When, on Redis's clock, a call sent at ``sent_us`` is abandoned; 0 (none) until known."""
        known = [x for x in (self.best, self.previous) if x is not None]
        return sent_us + min(known) + timeout_us if known else 0


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
        self._compiled: dict[tuple[str, str, str, str], _Compiled] = {}
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
        args: list[str | int] = []
        if budget is None:
            if not compiled.items:
                return Admission(rid, (), tokens, {})
            items, cost, payload = compiled.items, 0, compiled.payload(rid, tokens, deadline)
        else:
            cost = spend(tier.price.input_for(facts.endpoint), tier.price.output, facts.prompt_tokens, out_tokens)
            now = datetime.datetime.now(datetime.UTC)
            items = compiled.items + budget_items(principal.tenant, budget, cost, enforce_budget, now)
            args += [rid, self.ttl_us]
            for item in items:
                args += [item.kind, item.limit, item.period_us, tokens if item.kind == "t" else item.cost]
            payload = encode(("EVALSHA", self._admit.sha, len(items), *(i.key for i in items), *args, deadline))
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
                if budget is None:
                    payload = compiled.payload(rid, tokens, 0)
                else:
                    payload = encode(("EVALSHA", self._admit.sha, len(items), *(i.key for i in items), *args, 0))
                result = await self._call(payload, late)
        except ConnectionLost as exc:
            self._release_unknown(rid, items)
            return self._without_redis(policy, principal, items, rid, tokens, cost, budget, decision, exc)
        except REDIS_ERRORS as exc:  # timed out: a late reply is handled by _late
            return self._without_redis(policy, principal, items, rid, tokens, cost, budget, decision, exc)
        self.clock.observe(result[3], sent_us)
        headers = _headers(compiled, result)
        if not result[0]:
            item = items[result[1] - 1]
            if item.kind != "b":
                raise _rejection(item, result[2], headers, tokens)
            assert budget is not None
            raise _budget_refusal(principal.tenant, budget, item, decision, result[2], headers)
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
        try:
            return await self.conn.call_raw(payload, late)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):  # NOSCRIPT: not run (Redis restarted); load and resend
                raise
        await self.conn.call("SCRIPT", "LOAD", self._admit.source)
        return await self.conn.call_raw(payload, late)

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
        slots = [i for i in items if i.kind == "c"]
        if slots:
            self.released += 1
            for item in slots:
                self._zrem(item.key, rid)

    def _compiled_for(self, policy: Policy, principal: Principal, tier: str) -> _Compiled:
        shape = (policy.revision, principal.tenant, principal.key_id, tier)
        compiled = self._compiled.get(shape)
        if compiled is None:
            if len(self._compiled) > 50_000:
                self._compiled.clear()
            compiled = _Compiled(plan(policy, principal, tier, 0, self.ttl_us), self._admit.sha, self.ttl_us)
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
            log.error("admission_redis_unavailable", error=repr(exc), mode="fail_closed")
            raise StateUnavailable("Rate limits cannot be checked right now; try again shortly.") from None
        if policy.revision != self.local_policy_revision:
            self.local, self.local_policy_revision = Gcra(), policy.revision
        share = policy.expected_replicas
        for item in items:
            if item.kind == "b" and item.limit < 2**52:  # enforced (not a downgraded request's count)
                used = self.known_spend.get(item.key, 0) + self.local_spend.get(item.key, 0)
                if used + item.cost > item.limit:
                    assert budget is not None
                    log.warning("rejected_without_redis", error=repr(exc), mode="fail_open", limit="budget")
                    raise _budget_refusal(principal.tenant, budget, item, decision, 1_000_000, {})
        local_items = tuple(
            msgspec.structs.replace(
                i, limit=max(1, i.limit // share), key="local:" + i.key, cost=tokens if i.kind == "t" else i.cost
            )
            for i in items
            if i.kind != "b"
        )
        ok, failing = self.local.admit(local_items, rid, LOCAL_SLOT_TTL_US)
        log.warning("admitted_without_redis" if ok else "rejected_without_redis", error=repr(exc), mode="fail_open")
        if not ok:
            item = local_items[failing - 1]
            raise _rejection(item, int(item.emission_us * item.cost), {}, tokens)
        for item in items:
            if item.kind == "b":
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
            if i.kind == "t"
            else refund_spend
            if i.kind == "b"
            else (i.cost if i.kind == "r" and not reached else 0)
            for i in admission.items
        )
        if admission.local:
            self.local.settle(admission.items, admission.reservation_id, refunds)
            return
        if held:
            self._release_now(admission)
            # the slots are on their way: the batch carries only the refunds
            kept = [(i, r) for i, r in zip(admission.items, refunds, strict=True) if i.kind != "c"]
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
            if item.kind == "c":
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
                if item.kind == "c" or refund:
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
        replies = await self.conn.pipeline(commands)
        if any(isinstance(r, BaseException) for r in replies):
            # NOSCRIPT after a Redis restart, or a connection lost part-way: load and resend
            # (settling and renewing are idempotent)
            await self.conn.call("SCRIPT", "LOAD", script.source)
            retry = [commands[i] for i, r in enumerate(replies) if isinstance(r, BaseException)]
            again = await self.conn.pipeline(retry)
            failed = [r for r in again if isinstance(r, BaseException)]
            if failed:
                raise RedisError(f"{what} failed: {failed[0]}")

    async def renew(self) -> int:
        """Extend the concurrency slots of requests still in flight by one TTL, re-adding any that
        a long stall or a restart dropped (a request settled meanwhile has left ``_live``, and its
        release goes out after this renewal). Returns how many slots were renewed."""
        groups: dict[str, tuple[list[str], list[str]]] = {}
        for admission in list(self._live.values()):
            for item in admission.items:
                if item.kind == "c":
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
            if any(str(r).startswith("NOSCRIPT") for r in failed):
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.conn.call("SCRIPT", "LOAD", self._renew.source)
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


def _budget_refusal(
    tenant: str, budget: Budget, item: Item, decision: RoutingDecision, retry_us: int, headers: dict[str, str]
) -> Exception:
    """A spent budget: route to the cheaper tier if the budget says so, else 429 insufficient_quota."""
    if budget.downgrade_to is not None and decision.tier != budget.downgrade_to:
        return BudgetDowngrade(budget.downgrade_to)
    window = "daily" if ":budget:day:" in item.key else "monthly"
    retry_s = max(1, math.ceil(retry_us / 1_000_000))
    return BudgetExceeded(
        f"The {window} budget of tenant {tenant!r} (${Decimal(item.limit) / BUDGET_UNIT}) is spent.",
        tenant=tenant,
        headers={**headers, "retry-after": str(retry_s)},
    )


def _headers(compiled: _Compiled, result: list[int]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest request and token limits, from the script's
    reply (per item: remaining, microseconds to full), with item positions worked out in advance."""
    out: dict[str, str] = {}
    for positions, name in ((compiled.requests, "requests"), (compiled.tokens, "tokens")):
        if not positions:
            continue
        best = min(positions, key=lambda i: result[4 + 2 * i])
        out[f"x-ratelimit-limit-{name}"] = str(compiled.items[best].limit)
        out[f"x-ratelimit-remaining-{name}"] = str(result[4 + 2 * best])
        out[f"x-ratelimit-reset-{name}"] = duration(result[5 + 2 * best])
    return out


def _rejection(item: Item, retry_after_us: int, headers: dict[str, str], tokens: int) -> RateLimited:
    retry_s = max(1, math.ceil(retry_after_us / 1_000_000))
    what = {"r": "requests per minute", "t": "tokens per minute", "c": "concurrent requests"}[item.kind]
    detail = f" (this request needs {tokens} tokens)" if item.kind == "t" else ""
    return RateLimited(
        f"Rate limit reached: {item.limit} {what}{detail}. Please try again in {retry_s}s.",
        scope=item.scope,
        limit={"r": "requests", "t": "tokens", "c": "concurrency"}[item.kind],
        limit_type="tokens" if item.kind == "t" else "requests",
        headers={**headers, "retry-after": str(retry_s), "retry-after-ms": str(max(1, retry_after_us // 1000))},
    )
