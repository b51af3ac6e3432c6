"""Load a policy: YAML text → ``Raw*`` structs (strict) → cross-checked, immutable ``Policy``.

Every problem found is reported, not just the first, each as ``FILE:LINE: message``; the line
numbers come from the YAML node tree, which is kept beside the decoded data as a map from each
value's path to the line it starts on.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import re2

from gateway.policy.schema import (
    BUDGET_UNIT,
    Budget,
    BudgetAction,
    Compare,
    Fairness,
    GpuHour,
    Limit,
    Match,
    Placement,
    Policy,
    Price,
    Priority,
    Range,
    RawBudget,
    RawFairness,
    RawLimit,
    RawMatch,
    RawPolicy,
    RawRange,
    RawRetry,
    RawRoute,
    RawTier,
    RetryPolicy,
    Route,
    Scope,
    Shadow,
    Tier,
    TimeoutRetry,
    Timeouts,
)
from gateway.policy.yamlread import ConfigError, PathKey, Problems, convert, convert_top, dotted, read
from gateway.schemas import ENDPOINTS

SUPPORTED_VERSIONS = (1,)


class PolicyError(ConfigError):
    """A policy was refused; ``problems`` holds every ``FILE:LINE: message``."""


# --- step 2: cross-checks -----------------------------------------------------------------------


def _check_nonneg(value: Decimal, path: PathKey, problems: Problems, *, positive: bool = False) -> None:
    if value < 0 or (positive and value == 0):
        problems.add(path, f"{dotted(path)}: must be {'greater than 0' if positive else 'at least 0'}")


def _prices(raw: RawTier, path: PathKey, problems: Problems) -> tuple[Price, list[tuple[float, Price]]]:
    """The price in effect now, and every dated price (the ledger bills each request at its day's)."""
    entries = raw.price if isinstance(raw.price, list) else [] if raw.price is None else [raw.price]
    for i, p in enumerate(entries):
        ppath: PathKey = (*path, "price", i) if isinstance(raw.price, list) else (*path, "price")
        _check_nonneg(p.input, (*ppath, "input"), problems)
        _check_nonneg(p.output, (*ppath, "output"), problems)
        if p.embeddings is not None:
            _check_nonneg(p.embeddings, (*ppath, "embeddings"), problems)
        if p.cached_input is not None:
            _check_nonneg(p.cached_input, (*ppath, "cached_input"), problems)
    if raw.price is None and raw.gpu_hour is None:
        problems.add(path, f"{dotted(path)}: give a price, a gpu_hour price, or both")
    elif not entries and raw.price is not None:
        problems.add((*path, "price"), f"{dotted((*path, 'price'))}: give at least one price")
    dated = sorted(
        (
            (
                (
                    datetime.datetime.combine(p.effective_from, datetime.time(), datetime.UTC).timestamp()
                    if p.effective_from
                    else float("-inf")
                ),
                Price(p.input, p.output, p.embeddings, p.cached_input),
            )
            for p in entries
        ),
        key=lambda entry: entry[0],
    )
    if len({since for since, _ in dated}) != len(dated):
        problems.add((*path, "price"), f"{dotted((*path, 'price'))}: two prices take effect on the same day")
    now = time.time()
    in_effect = [p for since, p in dated if since <= now]
    current = in_effect[-1] if in_effect else (dated[0][1] if dated else Price(Decimal(0), Decimal(0)))
    if dated and not in_effect:
        problems.add(
            (*path, "price"), f"{dotted((*path, 'price'))}: no price is in effect yet; give one without effective_from"
        )
    return current, dated


def _workers(raw: RawTier, path: PathKey, problems: Problems) -> tuple[list[str], list[tuple[str, int]]]:
    """The tier's static worker URLs, and the capacities of those that override the tier's."""
    urls: list[str] = []
    capacities: list[tuple[str, int]] = []
    for i, worker in enumerate(raw.workers):
        wpath = (*path, "workers", i, "url")
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", worker.url):
            problems.add(wpath, f"{dotted(wpath)}: not an http(s) URL: '{worker.url}'")
        elif worker.url.rstrip("/") in urls:
            problems.add(wpath, f"{dotted(wpath)}: duplicate worker URL '{worker.url}'")
        urls.append(worker.url.rstrip("/"))
        if worker.max_inflight is not None:
            _check_positive_int(worker.max_inflight, (*path, "workers", i, "max_inflight"), problems)
            capacities.append((worker.url.rstrip("/"), worker.max_inflight))
    return urls, capacities


def _gpu_hour(raw: RawTier, path: PathKey, problems: Problems) -> GpuHour | None:
    if raw.gpu_hour is None:
        return None
    _check_nonneg(raw.gpu_hour.usd, (*path, "gpu_hour", "usd"), problems)
    if raw.gpu_hour.gpus_per_worker < 1:
        gpath = (*path, "gpu_hour", "gpus_per_worker")
        problems.add(gpath, f"{dotted(gpath)}: must be at least 1")
    return GpuHour(raw.gpu_hour.usd, raw.gpu_hour.gpus_per_worker)


def _tier(name: str, raw: RawTier, path: PathKey, problems: Problems) -> Tier:
    if not raw.model.strip():
        problems.add((*path, "model"), f"{dotted((*path, 'model'))}: must not be empty")
    current, dated = _prices(raw, path, problems)
    if raw.default_max_tokens <= 0:
        problems.add((*path, "default_max_tokens"), f"{dotted((*path, 'default_max_tokens'))}: must be greater than 0")
    if raw.max_context is not None and raw.max_context <= 0:
        problems.add((*path, "max_context"), f"{dotted((*path, 'max_context'))}: must be greater than 0")
    urls, capacities = _workers(raw, path, problems)
    for field in ("max_inflight", "max_queue", "queue_timeout_ms"):
        if (value := getattr(raw, field)) is not None:
            _check_positive_int(value, (*path, field), problems)
    t = raw.timeouts
    if t is not None:
        for field in ("connect", "first_byte", "idle"):
            _check_nonneg(getattr(t, field), (*path, "timeouts", field), problems, positive=True)
    timeouts = Timeouts(float(t.connect), float(t.first_byte), float(t.idle)) if t is not None else Timeouts()
    return Tier(
        gpu_hour=_gpu_hour(raw, path, problems),
        name=name,
        model=raw.model,
        workers=tuple(urls),
        price=current,
        prices=tuple(dated),
        max_context=raw.max_context,
        timeouts=timeouts,
        default_max_tokens=raw.default_max_tokens,
        discover_dns=raw.discover == "dns",
        discover_redis=raw.discover == "redis",
        affinity_header=_affinity(raw.affinity, path, problems),
        placement=Placement(raw.placement),
        max_inflight=raw.max_inflight,
        worker_max_inflight=tuple(capacities),
        max_queue=raw.max_queue,
        queue_timeout_s=raw.queue_timeout_ms / 1000,
        engine_priority=raw.scheduling_policy == "priority",
    )


def _check_positive_int(value: int, path: PathKey, problems: Problems) -> None:
    if value <= 0:
        problems.add(path, f"{dotted(path)}: must be greater than 0")


_CHOICES: dict[str, tuple[str, ...]] = {
    "placement": tuple(p.value for p in Placement),
    "scheduling_policy": ("fcfs", "priority"),
    "priority": tuple(p.name.lower() for p in Priority),
}


def _check_choices(raw: Any, path: PathKey, problems: Problems) -> Any:
    """A clearer message than msgspec's "Invalid enum value" for the placement keys that take one
    of a few words; the object comes back without a wrong one, so its other keys are still checked."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for key, allowed in _CHOICES.items():
        if key in raw and raw[key] not in allowed:
            kpath = (*path, key)
            problems.add(kpath, f"{dotted(kpath)}: must be one of {', '.join(allowed)}, not {raw[key]!r}")
            del out[key]
    return out


def _fairness(raw: Any, problems: Problems) -> Fairness:
    if raw is None:
        return Fairness()
    path: PathKey = ("fairness",)
    if isinstance(raw, dict) and isinstance(raw.get("key_priority"), dict):
        allowed = _CHOICES["priority"]
        good = {}
        for key_id, value in raw["key_priority"].items():
            if value in allowed:
                good[key_id] = value
            else:
                kpath = (*path, "key_priority", key_id)
                problems.add(kpath, f"{dotted(kpath)}: must be one of {', '.join(allowed)}, not {value!r}")
        raw = {**raw, "key_priority": good}
    f = convert(raw, RawFairness, path, problems)
    if f is None:
        return Fairness()
    _check_positive_int(f.default_weight, (*path, "default_weight"), problems)
    for tenant, weight in f.weights.items():
        _check_positive_int(weight, (*path, "weights", tenant), problems)
    return Fairness(
        MappingProxyType(dict(f.weights)),
        f.default_weight,
        MappingProxyType({k: Priority[v.upper()] for k, v in f.key_priority.items()}),
    )


def _affinity(raw: dict[str, str] | None, path: PathKey, problems: Problems) -> str | None:
    if raw is None:
        return None
    if set(raw) != {"header"} or not raw["header"].strip():
        apath = (*path, "affinity")
        problems.add(apath, f"{dotted(apath)}: use {{header: NAME}}")
        return None
    return raw["header"].strip().lower()


def _range(raw: RawRange | None, path: PathKey, problems: Problems) -> Range | None:
    if raw is None:
        return None
    bounds = {k: getattr(raw, k) for k in ("gt", "gte", "lt", "lte")}
    if all(v is None for v in bounds.values()):
        problems.add(path, f"{dotted(path)}: give at least one of gt, gte, lt, lte")
        return None
    for k, v in bounds.items():
        if v is not None and v < 0:
            problems.add((*path, k), f"{dotted((*path, k))}: must be at least 0")
    rng = Range(**bounds)
    lo = max([v + 1 for v in (raw.gt,) if v is not None] + [v for v in (raw.gte,) if v is not None] + [0])
    hi_candidates = [v - 1 for v in (raw.lt,) if v is not None] + [v for v in (raw.lte,) if v is not None]
    if hi_candidates and lo > min(hi_candidates):
        problems.add(path, f"{dotted(path)}: no number satisfies {rng.describe()}")
    return rng


def _match(raw: RawMatch | None, path: PathKey, problems: Problems) -> Match:
    if raw is None:
        return Match()
    regex = None
    if raw.content_regex is not None:
        rpath = (*path, "content_regex")
        try:
            regex = compile_regex(raw.content_regex)
        except ValueError as exc:
            problems.add(rpath, f"{dotted(rpath)}: {exc}")
    for field in ("task", "model", "tenant", "endpoint"):
        values = getattr(raw, field)
        if values is not None and not values:
            fpath = (*path, field)
            problems.add(fpath, f"{dotted(fpath)}: must list at least one value")
    for i, name in enumerate(raw.endpoint or ()):
        if name not in ENDPOINTS:
            epath = (*path, "endpoint", i)
            known = ", ".join(ENDPOINTS)
            problems.add(epath, f"{dotted((*path, 'endpoint'))}: unknown endpoint '{name}' (known: {known})")
    return Match(
        task=frozenset(raw.task) if raw.task else None,
        model=frozenset(raw.model) if raw.model else None,
        tenant=frozenset(raw.tenant) if raw.tenant else None,
        prompt_tokens=_range(raw.prompt_tokens, (*path, "prompt_tokens"), problems),
        max_tokens=_range(raw.max_tokens, (*path, "max_tokens"), problems),
        budget_used_pct=_range(raw.budget_used_pct, (*path, "budget_used_pct"), problems),
        stream=raw.stream,
        header=tuple((k.lower(), v) for k, v in raw.header.items()) if raw.header else None,
        content_regex=regex,
        endpoint=frozenset(raw.endpoint) if raw.endpoint else None,
    )


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error is reported as FILE:LINE, not printed on stderr
_RE2_MAX_MEM = 8 << 20  # RE2's default, stated: each compiled pattern (and its match-time DFA) stays under it
_RE2_OPTIONS.max_mem = _RE2_MAX_MEM


def compile_regex(pattern: str) -> re2._Regexp[str]:
    """``content_regex`` runs on every request's last user message, so it runs on RE2, whose
    matching time is linear in the text: a pattern such as ``(a+)+$`` cannot backtrack for
    seconds on a client's crafted message. RE2 alone judges a pattern (its syntax, not Python's:
    ``\\p{L}`` is valid); ``ValueError`` gives its reason, with a hint where one helps."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    hint = next((h for start, h in _RE2_HINTS if reason.startswith(start)), "")
    raise ValueError(f"RE2, the linear-time engine content_regex runs on, cannot run this pattern: {reason}{hint}")


_NO_BACKTRACKING = " (RE2 has no backreferences or look-around, and repeats at most 1000 times)"
_RE2_HINTS = (
    ("invalid escape sequence", _NO_BACKTRACKING),
    ("invalid perl operator", _NO_BACKTRACKING),
    ("invalid repetition size", _NO_BACKTRACKING),
    ("bad repetition operator", _NO_BACKTRACKING),
    (
        "pattern too large",
        f" (compiled, it would take more than RE2's {_RE2_MAX_MEM >> 20} MiB: repeat less, "
        "e.g. `+` rather than `{1000}`)",
    ),
)


def _budgets(raw: list[Any], tiers: dict[str, Any], problems: Problems) -> dict[str, Budget]:
    out: dict[str, Budget] = {}
    for i, item in enumerate(raw):
        path: PathKey = ("budgets", i)
        where = f"budgets[{i}]"
        b = convert(item, RawBudget, path, problems)
        if b is None:
            continue
        if b.daily_usd is None and b.monthly_usd is None:
            problems.add(path, f"{where}: give daily_usd, monthly_usd or both")
        for field in ("daily_usd", "monthly_usd"):
            value = getattr(b, field)
            if value is not None and value <= 0:
                problems.add((*path, field), f"{where}.{field}: must be greater than 0")
        if b.action is BudgetAction.DOWNGRADE:
            if b.downgrade_to is None:
                problems.add(path, f"{where}: a downgrade names its tier in downgrade_to")
            elif b.downgrade_to not in tiers:
                problems.add((*path, "downgrade_to"), f"{where}.downgrade_to: unknown tier '{b.downgrade_to}'")
        elif b.downgrade_to is not None:
            problems.add((*path, "downgrade_to"), f"{where}.downgrade_to: only a downgrade budget has one")
        if b.tenant in out:
            problems.add((*path, "tenant"), f"{where}.tenant: a budget for '{b.tenant}' is already given")

        def units(usd: Decimal | None) -> int | None:
            return int(usd * BUDGET_UNIT) if usd is not None else None

        out[b.tenant] = Budget(b.tenant, units(b.daily_usd), units(b.monthly_usd), b.downgrade_to)
    return out


def _split(
    route: RawRoute, i: int, path: PathKey, tiers: dict[str, Any], problems: Problems
) -> tuple[tuple[tuple[str, int], ...], str | None]:
    if route.split is None:
        if route.split_by is not None:
            problems.add((*path, "split_by"), f"routes[{i}].split_by: only a route with a split has one")
        return (), None
    spath = (*path, "split")
    if not route.split:
        problems.add(spath, f"routes[{i}].split: name at least one tier with a weight")
    for tier, weight in route.split.items():
        if tier not in tiers:
            problems.add((*spath, tier), f"routes[{i}].split: unknown tier '{tier}'")
        if weight <= 0:
            problems.add((*spath, tier), f"routes[{i}].split.{tier}: weight must be greater than 0")
    header = None
    by = route.split_by
    if isinstance(by, dict):
        if set(by) != {"header"} or not by["header"].strip():
            problems.add((*path, "split_by"), f"routes[{i}].split_by: use 'tenant', 'prompt' or {{header: NAME}}")
        else:
            header = by["header"].strip().lower()
    elif by not in (None, "tenant", "prompt"):
        problems.add(
            (*path, "split_by"), f"routes[{i}].split_by: use 'tenant', 'prompt' or {{header: NAME}}, not {by!r}"
        )
    return tuple(route.split.items()), header


def _shadow(route: RawRoute, i: int, path: PathKey, tiers: dict[str, Any], problems: Problems) -> Shadow | None:
    raw = route.shadow
    if raw is None:
        return None
    where = f"routes[{i}].shadow"
    spath = (*path, "shadow")
    if raw.tier not in tiers:
        problems.add((*spath, "tier"), f"{where}.tier: unknown tier '{raw.tier}'")
    if not 0 < raw.sample <= 1:
        problems.add((*spath, "sample"), f"{where}.sample: must be greater than 0 and at most 1")
    if not 0 <= raw.threshold <= 1:
        problems.add((*spath, "threshold"), f"{where}.threshold: must be between 0 and 1")
    if raw.max_in_flight < 1:
        problems.add((*spath, "max_in_flight"), f"{where}.max_in_flight: must be at least 1")
    return Shadow(raw.tier, float(raw.sample), Compare(raw.compare), float(raw.threshold), raw.max_in_flight)


def _limits(raw: list[Any], tiers: dict[str, Any], problems: Problems) -> tuple[Limit, ...]:
    out = []
    for i, item in enumerate(raw):
        path: PathKey = ("limits", i)
        lim = convert(item, RawLimit, path, problems)
        if lim is None:
            continue
        where = f"limits[{i}]"
        if lim.rpm is None and lim.tpm is None and lim.concurrency is None:
            problems.add(path, f"{where}: give at least one of rpm, tpm, concurrency")
        for field in ("rpm", "tpm", "concurrency"):
            value = getattr(lim, field)
            if value is not None and value <= 0:
                problems.add((*path, field), f"{where}.{field}: must be greater than 0")
        if lim.tier is not None:
            if lim.scope in (Scope.KEY, Scope.TENANT):
                problems.add((*path, "tier"), f"{where}.tier: only tier and tenant+tier limits name a tier")
            elif lim.tier not in tiers:
                problems.add((*path, "tier"), f"{where}.tier: unknown tier '{lim.tier}'")
        out.append(Limit(i, lim.scope, lim.tenant, lim.tier, lim.rpm, lim.tpm, lim.concurrency, problems.line_of(path)))
    return tuple(out)


def parse(text: str, source: str = "<policy>", revision: str | None = None) -> Policy:
    """Validate policy text; raise ``PolicyError`` with every problem found."""
    try:
        data, problems = read(text, source)
    except ConfigError as exc:
        raise PolicyError(exc.problems) from None
    if not isinstance(data, dict):
        raise PolicyError([f"{source}:1: a policy is a mapping with version, tiers and routes"])
    top = convert_top(data, RawPolicy, problems, {"version": SUPPORTED_VERSIONS[0]})
    if top.version not in SUPPORTED_VERSIONS:
        problems.add(("version",), f"version: unsupported policy version {top.version!r} (supported: 1)")

    tiers: dict[str, Tier] = {}
    raw_tiers = top.tiers
    if not raw_tiers and isinstance(data.get("tiers", {}), dict):
        problems.add(("tiers",), "tiers: define at least one tier as a mapping of name to tier")
    for name, raw in raw_tiers.items():
        path: PathKey = ("tiers", name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            problems.add(path, f"tiers.{name}: tier names use letters, digits, '_', '.', '-'")
        tier = convert(_check_choices(raw, path, problems), RawTier, path, problems)
        tiers[name] = (
            _tier(name, tier, path, problems)
            if tier
            else Tier(name, "", (), Price(Decimal(0), Decimal(0)), None, Timeouts())
        )

    raw_routes = top.routes
    if not raw_routes and isinstance(data.get("routes", []), list):
        problems.add(("routes",), "routes: define at least one route as a list")
    routes = _routes(raw_routes, raw_tiers, problems)
    retry = _retry(top.retry, problems)
    limits = _limits(top.limits, raw_tiers, problems)
    budgets = _budgets(top.budgets, raw_tiers, problems)
    fairness = _fairness(top.fairness, problems)

    if problems.items:
        raise PolicyError(problems.render())
    sha = hashlib.sha256(text.encode()).hexdigest()
    return Policy(
        tiers=MappingProxyType(tiers),
        routes=tuple(routes),
        retry=retry,
        source=source,
        sha256=sha,
        revision=revision or sha[:12],
        aliases=frozenset(a for r in routes if r.match.model for a in r.match.model),
        header_names=frozenset(
            [name for r in routes if r.match.header for name, _ in r.match.header]
            + [r.split_header for r in routes if r.split_header]
            + [t.affinity_header for t in tiers.values() if t.affinity_header]
        ),
        limits=limits,
        budgets=MappingProxyType(budgets),
        auth=top.auth,
        on_redis_error=top.on_redis_error,
        expected_replicas=top.expected_replicas,
        max_n=top.max_n,
        fairness=fairness,
    )


def _routes(raw_routes: list[Any], raw_tiers: dict[str, Any], problems: Problems) -> list[Route]:
    routes: list[Route] = []
    seen_names: dict[str, int] = {}
    catch_all: Route | None = None
    for i, raw in enumerate(raw_routes):
        path = ("routes", i)
        route = convert(_check_choices(raw, path, problems), RawRoute, path, problems)
        if route is None:
            continue
        if route.spill_after_ms is not None:
            _check_positive_int(route.spill_after_ms, (*path, "spill_after_ms"), problems)
            if not route.fallback:
                problems.add(
                    (*path, "spill_after_ms"), f"routes[{i}].spill_after_ms: a route spills to its fallback; give one"
                )
        line = problems.line_of(path)
        split, split_header = _split(route, i, path, raw_tiers, problems)
        if route.tier is None and not split:
            if route.split is None:
                problems.add(path, f"routes[{i}]: give a tier (or a split)")
            route.tier = next(iter(raw_tiers), "")
        elif route.tier is None:
            route.tier = split[0][0]
        elif route.split is not None:
            problems.add((*path, "split"), f"routes[{i}]: give either tier or split, not both")
        if route.name in seen_names:
            problems.add(
                (*path, "name"),
                f"routes[{i}].name: duplicate route name '{route.name}' (first at line {seen_names[route.name]})",
            )
        seen_names.setdefault(route.name, line)
        if not split and route.split is None and route.tier not in raw_tiers:
            problems.add((*path, "tier"), f"routes[{i}].tier: unknown tier '{route.tier}'")
        _fallbacks(route, i, path, raw_tiers, problems)
        match = _match(route.match, (*path, "match"), problems)
        shadow = _shadow(route, i, path, raw_tiers, problems)
        compiled = Route(
            route.name,
            route.tier,
            match,
            tuple(route.fallback),
            line,
            split,
            split_header,
            shadow,
            route.split_by == "prompt",
            route.spill_after_ms,
            Priority.named(route.priority),
        )
        if catch_all is not None:
            problems.add(
                path,
                f"routes[{i}]: route '{route.name}' is unreachable: "
                f"route '{catch_all.name}' (line {catch_all.line}) matches every request",
            )
        elif route.match is None or all(getattr(route.match, f) is None for f in route.match.__struct_fields__):
            catch_all = compiled  # judged on what was written, so an invalid condition does not cascade
        routes.append(compiled)

    return routes


def _fallbacks(route: RawRoute, i: int, path: PathKey, raw_tiers: dict[str, Any], problems: Problems) -> None:
    for j, fb in enumerate(route.fallback):
        fpath = (*path, "fallback", j)
        if fb not in raw_tiers:
            problems.add(fpath, f"routes[{i}].fallback[{j}]: unknown tier '{fb}'")
        elif fb == route.tier or fb in route.fallback[:j]:
            problems.add(fpath, f"routes[{i}].fallback[{j}]: tier '{fb}' is already tried earlier")


def _retry(raw_retry: RawRetry | None, problems: Problems) -> RetryPolicy:
    if raw_retry is None:
        return RetryPolicy()
    for field in ("attempts_per_tier", "max_attempts"):
        if getattr(raw_retry, field) < 1:
            problems.add(("retry", field), f"retry.{field}: must be at least 1")
    _check_nonneg(raw_retry.deadline_s, ("retry", "deadline_s"), problems, positive=True)
    if raw_retry.short_max_tokens < 0:
        problems.add(("retry", "short_max_tokens"), "retry.short_max_tokens: must be at least 0")
    return RetryPolicy(
        raw_retry.attempts_per_tier,
        raw_retry.max_attempts,
        float(raw_retry.deadline_s),
        TimeoutRetry(raw_retry.on_timeout),
        raw_retry.short_max_tokens,
    )


def load(path: str | Path, revision: str | None = None) -> Policy:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([f"{p}:1: cannot read policy: {exc}"]) from None
    return parse(text, str(p), revision)
