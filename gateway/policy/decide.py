"""Routing decisions: a pure function of an immutable ``Policy`` and one request's ``RequestFacts``.

``decide`` walks the routes in order; the first whose conditions all hold and one of whose tiers
fits the prompt wins. ``conditions`` yields each condition with whether it held, which is what
``matches`` uses and what an explanation shows: there is one definition of what a condition means.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import msgspec

from gateway.errors import ContextTooLong, InvalidRequest, ModelNotFound, NoRouteMatched
from gateway.facts import RequestFacts
from gateway.policy.schema import Match, Policy, Priority, Route, Shadow

AUTO_MODEL = "auto"


class RoutingDecision(msgspec.Struct, frozen=True):
    policy_revision: str
    route: str
    tier: str
    fallbacks: tuple[str, ...]
    split_side: str | None = None  # the tier a split route chose for this caller
    shadow: Shadow | None = None  # the route's shadow (gateway/shadow.py samples and sends it)
    spill_after_ms: int | None = None  # the route's bound on the tier's queue wait (then: fallback)
    priority: Priority | None = None  # the route's queue class


class Condition(msgspec.Struct, frozen=True):
    name: str
    expected: Any
    actual: Any
    held: bool


def conditions(match: Match, facts: RequestFacts) -> Iterator[Condition]:
    """Each condition of ``match`` in a fixed order, lazily, with whether it held for ``facts``."""
    if match.endpoint is not None:
        held = facts.endpoint in match.endpoint
        yield Condition("endpoint", sorted(match.endpoint), facts.endpoint, held)
    if match.task is not None:
        yield Condition("task", sorted(match.task), facts.task, facts.task in match.task)
    if match.model is not None:
        yield Condition("model", sorted(match.model), facts.model, facts.model in match.model)
    if match.tenant is not None:
        yield Condition("tenant", sorted(match.tenant), facts.tenant, facts.tenant in match.tenant)
    if match.prompt_tokens is not None:
        rng = match.prompt_tokens
        yield Condition("prompt_tokens", rng.describe(), facts.prompt_tokens, rng.contains(facts.prompt_tokens))
    if match.max_tokens is not None:
        rng = match.max_tokens
        held = facts.max_tokens is not None and rng.contains(facts.max_tokens)
        yield Condition("max_tokens", rng.describe(), facts.max_tokens, held)
    if match.stream is not None:
        yield Condition("stream", match.stream, facts.stream, facts.stream is match.stream)
    if match.header is not None:
        for name, value in match.header:
            actual = facts.headers.get(name)
            yield Condition(f"header.{name}", value, actual, actual == value)
    if match.budget_used_pct is not None:
        rng = match.budget_used_pct
        yield Condition("budget_used_pct", rng.describe(), facts.budget_used_pct, rng.contains(facts.budget_used_pct))
    if match.content_regex is not None:
        found = match.content_regex.search(facts.last_user_text) is not None
        yield Condition("content_regex", match.content_regex.pattern, found, found)


def matches(match: Match, facts: RequestFacts) -> bool:
    return all(c.held for c in conditions(match, facts))


def split_side(route: Route, facts: RequestFacts) -> str:
    """A split route's tier for this caller: a stable hash of (route, tenant, header or prompt) over
    the weights, so one caller (or one prompt, with ``split_by: prompt``) always lands on the same side."""
    if route.split_header:
        value = facts.headers.get(route.split_header, "")
    else:
        value = facts.last_user_text if route.split_prompt else facts.tenant
    digest = hashlib.blake2b(f"{route.name}\0{value}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") % sum(w for _, w in route.split)
    for tier, weight in route.split:
        if point < weight:
            return tier
        point -= weight
    raise AssertionError("unreachable")  # pragma: no cover


def fitting_tiers(policy: Policy, route: Route, facts: RequestFacts) -> tuple[str, ...]:
    """The route's tier (for a split, this caller's side) and fallbacks, in order, without those
    whose context the request overflows."""
    needed = facts.prompt_tokens + (facts.max_tokens or 0)
    first = split_side(route, facts) if route.split else route.tier
    out = []
    for name in dict.fromkeys((first, *route.fallback)):
        limit = policy.tiers[name].max_context
        if limit is None or needed <= limit:
            out.append(name)
    return tuple(out)


def check_model(policy: Policy, model: str) -> None:
    if model != AUTO_MODEL and model not in policy.aliases:
        known = ", ".join(sorted({AUTO_MODEL, *policy.aliases}))
        raise ModelNotFound(f"The model `{model}` does not exist. Known models: {known}.", param="model")


def check_completions(policy: Policy, completions: int) -> None:
    if completions > policy.max_n:
        raise InvalidRequest(
            f"This request asks for {completions} completions (n, best_of); at most {policy.max_n} are allowed.",
            param="n",
        )


def decide(policy: Policy, facts: RequestFacts) -> RoutingDecision:
    check_model(policy, facts.model)
    check_completions(policy, facts.completions)
    too_long: Route | None = None  # the first route that matched but whose tiers are all too small
    for route in policy.routes:
        if not matches(route.match, facts):
            continue
        tiers = fitting_tiers(policy, route, facts)
        if tiers:
            side = split_side(route, facts) if route.split else None
            return RoutingDecision(
                policy.revision,
                route.name,
                tiers[0],
                tiers[1:],
                side,
                route.shadow,
                route.spill_after_ms,
                route.priority,
            )
        too_long = too_long or route
    if too_long is not None:
        names = dict.fromkeys((*(t for t, _ in too_long.split), too_long.tier, *too_long.fallback))
        largest = max(policy.tiers[n].max_context or 0 for n in names if n)
        asked = f" + max_tokens={facts.max_tokens}" if facts.max_tokens else ""
        raise ContextTooLong(
            f"This request needs {facts.prompt_tokens + (facts.max_tokens or 0)} tokens of context "
            f"(about {facts.prompt_tokens} prompt tokens{asked}); the largest context among the tiers of "
            f"route {too_long.name!r} is {largest}. Shorten the prompt or lower max_tokens.",
            param="max_tokens" if facts.max_tokens else None,
        )
    raise NoRouteMatched(
        f"No route of policy {policy.revision} matches this request "
        f"(model={facts.model!r}, task={facts.task!r}, prompt_tokens={facts.prompt_tokens})."
    )
