"""A guarded, staged rollout of a candidate policy: ``gateway policy apply FILE --ramp 10,50,100``.

The routes whose tier the candidate changes (compared with the active version) are ramped: each
step below 100 applies the candidate with those routes split ``{new: x, old: 100 - x}`` by prompt
(``split_by: prompt``, so one tenant's traffic moves by the step's share), the old tier as their
fallback and a shadow to the old tier (the candidate's own, else ``sample`` 0.05), so agreement
keeps being measured. The last step applies the candidate itself. Each step is an applied version
— stored, announced, and in the audit trail with its share and its guard.

During each step the guard reads the ledger's records written since the step began, for the
ramped routes only: their shadow comparisons where the new tier answered the client, and their
requests the new tier served. It rolls back — re-applies the version active before the ramp, with
the reason in the audit trail — as soon as the agreement is confidently below ``min_agreement``
(the upper end of its 95% Wilson interval is under it) or the error rate confidently above
``max_error_rate`` (the lower end of its interval is over it), judged once ``min_samples`` have
been seen (so one unlucky early comparison cannot end a ramp). A step ends after ``step_s`` seconds
once it has seen at least ``step_samples`` comparisons.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
import yaml

from gateway.evidence import wilson
from gateway.ledger import SHADOW_OUTCOME, STREAM, from_fields
from gateway.policy.load import parse
from gateway.policy.store import PolicyStore, Version
from gateway.policy.suggest import _Dumper, _Loader
from gateway.store import Client

FAILED = frozenset({"error", "timeout", "partial"})


class Moved(msgspec.Struct, frozen=True):
    route: str
    old: str
    new: str


class Watch(msgspec.Struct):
    compared: int = 0
    agree: int = 0
    requests: int = 0
    errors: int = 0


class Guard(msgspec.Struct, frozen=True):
    min_agreement: float = 0.9
    max_error_rate: float = 0.05
    step_s: float = 60.0
    step_samples: int = 0
    poll_s: float = 1.0
    min_samples: int = 10  # comparisons (requests, for the error rate) before the guard judges at all


class Outcome(msgspec.Struct):
    completed: bool
    steps: list[int]  # versions applied, in order (a roll-back's last)
    reason: str


def moved_routes(current: str, candidate: str) -> list[Moved]:
    before = {r.name: r for r in parse(current, "<active>").routes}
    out = []
    for r in parse(candidate, "<candidate>").routes:
        old = before.get(r.name)
        if old is not None and not old.split and not r.split and old.tier != r.tier:
            out.append(Moved(r.name, old.tier, r.tier))
    return out


def step_text(candidate: str, moved: list[Moved], share: int, note: str) -> str:
    data = yaml.load(candidate, Loader=_Loader)
    names = {m.route: m for m in moved}
    for raw in data["routes"]:
        m = names.get(raw.get("name"))
        if m is None:
            continue
        raw.pop("tier", None)
        raw["split"] = {m.new: share, m.old: 100 - share}
        raw["split_by"] = "prompt"
        raw["fallback"] = [m.old, *(f for f in raw.get("fallback", []) if f not in (m.old, m.new))]
        if not raw.get("shadow"):
            raw["shadow"] = {"tier": m.old, "sample": 0.05}
    return note + yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)


async def watch(client: Client, moved: list[Moved], since_ms: int, seen: Watch, cursor: str) -> str:
    """Add the ramped routes' records written after ``cursor`` (a stream id) to ``seen``; the new cursor."""
    routes = {m.route: m for m in moved}
    start = cursor or f"{since_ms}-0"
    while True:
        page: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(  # type: ignore[assignment]
            STREAM, min=start, max="+", count=1000
        )
        page = [p for p in page if p[0].decode() != cursor]
        if not page:
            return cursor
        for entry_id, fields in page:
            rec = from_fields({k.decode(): v.decode() for k, v in fields.items()})
            cursor = entry_id.decode()
            m = routes.get(rec.route)
            if m is None:
                continue
            if rec.outcome == SHADOW_OUTCOME:
                if rec.primary_tier == m.new and rec.agree is not None:
                    seen.compared += 1
                    seen.agree += 1 if rec.agree else 0
            elif rec.tier == m.new:
                seen.requests += 1
                seen.errors += 1 if rec.outcome in FAILED else 0
        start = cursor


def verdict(seen: Watch, min_agreement: float, max_error_rate: float, min_samples: int = 10) -> str | None:
    """Why the step must roll back, or None (also while fewer than ``min_samples`` were seen)."""
    if seen.compared >= max(min_samples, 1):
        low, high = wilson(seen.agree, seen.compared)
        if high < min_agreement:
            return (
                f"agreement {seen.agree}/{seen.compared} = {seen.agree / seen.compared:.1%} "
                f"(95% CI {low:.1%}..{high:.1%}) is below {min_agreement:.1%}"
            )
    if seen.requests >= max(min_samples, 1):
        low, high = wilson(seen.errors, seen.requests)
        if low > max_error_rate:
            return (
                f"error rate {seen.errors}/{seen.requests} = {seen.errors / seen.requests:.1%} "
                f"(95% CI {low:.1%}..{high:.1%}) is above {max_error_rate:.1%}"
            )
    return None


async def ramp(
    store: PolicyStore,
    candidate: str,
    *,
    source: str,
    author: str,
    message: str,
    shares: list[int],
    guard: Guard,
    say: Callable[[str], Any] = print,
) -> Outcome:
    parse(candidate, source)  # every problem, before anything changes
    before = await store.active()
    if before is None:
        raise LookupError("no policy is active in Redis to ramp from: apply the candidate without --ramp first")
    moved = moved_routes(before.yaml, candidate)
    if not moved:
        version, _ = await store.apply(candidate, source=source, author=author, message=message)
        say(f"no route changes tier: applied {source} as v{version.version} at once")
        return Outcome(True, [version.version], "nothing to ramp")
    what = ", ".join(f"{m.route} {m.old}->{m.new}" for m in moved)
    rule = f"guard: agreement >= {guard.min_agreement:.0%}, error rate <= {guard.max_error_rate:.0%}"
    applied: list[int] = []
    steps = [s for s in shares if 0 < s < 100] + [100]
    for i, share in enumerate(steps, 1):
        note = f"ramp step {i}/{len(steps)}: {what} at {share}% ({rule})" + (f"; {message}" if message else "")
        text = candidate if share == 100 else step_text(candidate, moved, share, f"# {note}\n")
        started_ms = int(time.time() * 1000)
        version, _ = await store.apply(text, source=source, author=author, message=note)
        applied.append(version.version)
        say(f"v{version.version}: {note}")
        if share == 100:
            return Outcome(True, applied, "reached 100%")
        reason = await _hold(store.redis, moved, started_ms, guard, say)
        if reason is not None:
            back = await _roll_back(store, before, author, f"ramp rolled back at step {i}/{len(steps)}: {reason}")
            applied.append(back.version)
            say(f"v{back.version}: rolled back to v{before.version}'s policy: {reason}")
            return Outcome(False, applied, reason)
    raise AssertionError("unreachable: the last step is 100%")  # pragma: no cover


async def _hold(
    client: Client,
    moved: list[Moved],
    started_ms: int,
    guard: Guard,
    say: Callable[[str], Any],
) -> str | None:
    seen, cursor = Watch(), ""
    deadline = time.monotonic() + guard.step_s
    while True:
        await asyncio.sleep(guard.poll_s)
        cursor = await watch(client, moved, started_ms, seen, cursor)
        reason = verdict(seen, guard.min_agreement, guard.max_error_rate, guard.min_samples)
        if reason is not None:
            return reason
        if time.monotonic() >= deadline and seen.compared >= guard.step_samples:
            say(
                f"  step held: {seen.agree}/{seen.compared} comparisons agreed, "
                f"{seen.errors}/{seen.requests} requests failed on the new tier"
            )
            return None


async def _roll_back(store: PolicyStore, before: Version, author: str, message: str) -> Version:
    version, _ = await store.apply(before.yaml, source=before.source, author=author, message=message)
    return version
