"""Simulate a policy change on recorded traffic, without calling any worker.

Each line of the traffic file is routed through ``decide`` under the candidate policy (and, with
``--against``, the current one); the report gives, per tier and per route, requests, input and
output tokens and cost, the totals, the difference, and how many requests moved from which route
to which.

A line is one of:
- a request body (``{"model": …, "messages": …}`` or ``{"model": …, "prompt": …}``), or
  ``{"body": {…}, "tenant": …, "headers": {…}}``. Input tokens are the gateway's tiktoken
  estimate; output tokens are the request's ``max_tokens``, else the chosen tier's
  ``default_max_tokens`` — the report says how many lines used which;
- a ledger record (it has ``prompt_tokens`` and ``completion_tokens``): the recorded token counts
  are used, and routing sees its ``tenant``, ``task``, ``model``, ``stream``, ``max_tokens``.

Costs are summed as integer tokens per (route, tier) and priced once at the end, exactly.
Big files are split over the machine's cores.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import msgspec

from gateway import tokens
from gateway.errors import GatewayError
from gateway.facts import DEFAULT_TENANT, RequestFacts, gather
from gateway.ledger import SHADOW_OUTCOME
from gateway.policy.decide import decide
from gateway.policy.load import load
from gateway.policy.schema import Policy
from gateway.schemas import ENDPOINTS, Endpoint, decode_request

_decode = msgspec.json.Decoder()


class Tally(msgspec.Struct):
    """What one policy did with the traffic: tokens per (route, tier) and request counts."""

    requests: Counter[tuple[str, str]] = msgspec.field(default_factory=Counter)
    input: Counter[tuple[str, str]] = msgspec.field(default_factory=Counter)
    output: Counter[tuple[str, str]] = msgspec.field(default_factory=Counter)
    unroutable: int = 0

    def merge(self, other: Tally) -> None:
        self.requests.update(other.requests)
        self.input.update(other.input)
        self.output.update(other.output)
        self.unroutable += other.unroutable


class Partial(msgspec.Struct):
    lines: int = 0
    shadow: int = 0  # ledger records of shadow calls: not client traffic, skipped
    invalid: int = 0
    invalid_examples: list[str] = msgspec.field(default_factory=list)
    output_from: Counter[str] = msgspec.field(default_factory=Counter)
    tallies: list[Tally] = msgspec.field(default_factory=list)
    moves: Counter[tuple[str, str]] = msgspec.field(default_factory=Counter)


class _RecordLine(msgspec.Struct):
    """A ledger-style traffic line: recorded token counts, and what routing looks at."""

    prompt_tokens: int
    completion_tokens: int
    tenant: str | None = None
    task: str | None = None
    model_alias: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    stream: bool = False
    headers: dict[str, str] | None = None
    endpoint: str = "chat"


class _BodyLine(msgspec.Struct):
    """``{"body": {…}, "tenant": …, "headers": {…}}`` around a request body."""

    body: dict[str, Any] | None = None
    tenant: str | None = None
    headers: dict[str, str] | None = None
    endpoint: str | None = None  # an Endpoint label; else chat or completions, from the body


def facts_of(line: dict[str, Any]) -> tuple[RequestFacts, int | None]:
    """Routing facts of one traffic line, and its recorded output tokens (None for request bodies).
    A line of the wrong shape raises ``ValueError`` naming the field; a bad body, ``InvalidRequest``."""
    try:
        if "prompt_tokens" in line and "completion_tokens" in line:  # a ledger record
            rec = msgspec.convert(line, _RecordLine)
            f = RequestFacts(
                tenant=rec.tenant or DEFAULT_TENANT,
                task=rec.task,
                model=rec.model_alias or rec.model or "auto",
                prompt_tokens=rec.prompt_tokens,
                max_tokens=rec.max_tokens,
                stream=rec.stream,
                headers={k.lower(): v for k, v in (rec.headers or {}).items()},
                endpoint=rec.endpoint,
            )
            return f, rec.completion_tokens
        wrapped = msgspec.convert(line, _BodyLine)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    body = line if wrapped.body is None else wrapped.body
    headers = {k.lower(): v for k, v in (wrapped.headers or {}).items()}
    if wrapped.endpoint is not None:
        if wrapped.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {wrapped.endpoint!r}")
        endpoint = ENDPOINTS[wrapped.endpoint]
    else:
        endpoint = Endpoint.COMPLETIONS if "prompt" in body and "messages" not in body else Endpoint.CHAT
    parsed = decode_request(endpoint, msgspec.json.encode(body))
    tenant = wrapped.tenant or DEFAULT_TENANT
    return gather(parsed, tokens.count_sync(parsed), tenant, headers, frozenset(headers)), None


def run_lines(policies: list[Policy], lines: Iterable[tuple[int, bytes]]) -> Partial:
    part = Partial(tallies=[Tally() for _ in policies])
    for number, raw in lines:
        if not raw.strip():
            continue
        part.lines += 1
        try:
            line = _decode.decode(raw)
            if not isinstance(line, dict):
                raise ValueError("not a JSON object")
            if line.get("outcome") == SHADOW_OUTCOME:
                part.lines -= 1
                part.shadow += 1
                continue
            facts, recorded_output = facts_of(line)
        except (msgspec.DecodeError, ValueError, TypeError, KeyError, GatewayError) as exc:
            part.invalid += 1
            if len(part.invalid_examples) < 5:
                part.invalid_examples.append(f"line {number}: {getattr(exc, 'message', exc)}")
            continue
        routes = []
        for policy, tally in zip(policies, part.tallies, strict=True):
            try:
                d = decide(policy, facts)
            except GatewayError:
                tally.unroutable += 1
                routes.append("(no route)")
                continue
            key = (d.route, d.tier)
            tally.requests[key] += 1
            tally.input[key] += facts.prompt_tokens
            if recorded_output is not None:
                out, source = recorded_output, "recorded"
            else:
                out = facts.output_estimate(policy.tiers[d.tier].default_max_tokens)
                source = "max_tokens" if facts.max_tokens is not None or not out else "default_max_tokens"
            tally.output[key] += out
            if policy is policies[0]:
                part.output_from[source] += 1
            routes.append(d.route)
        if len(routes) == 2 and routes[0] != routes[1]:
            part.moves[(routes[1], routes[0])] += 1  # from the current policy's route to the candidate's
    return part


_POLICIES: list[Policy] = []


def _init(paths: list[str]) -> None:
    _POLICIES[:] = [load(p) for p in paths]
    tokens.encoding()


def _work(chunk: list[tuple[int, bytes]]) -> Partial:
    return run_lines(_POLICIES, chunk)


def _chunks(path: Path, size: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            chunk.append((number, raw))
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _merge(total: Partial, part: Partial, progress: bool = False) -> None:
    total.lines += part.lines
    total.shadow += part.shadow
    total.invalid += part.invalid
    total.invalid_examples += part.invalid_examples[: 5 - len(total.invalid_examples)]
    total.output_from.update(part.output_from)
    total.moves.update(part.moves)
    for t, p in zip(total.tallies, part.tallies, strict=True):
        t.merge(p)
    if progress and total.lines and total.lines % 100_000 < 20_000:
        print(f"  {total.lines:,} lines…", file=sys.stderr, flush=True)


async def simulate_ledger(
    client: Any, candidate: str, against: str | None = None, since: str | None = None, until: str | None = None
) -> dict[str, Any]:
    """``simulate`` on the traffic the ledger recorded in [since, until] (its client requests; shadow
    calls are skipped), read page by page: the same result as on ``ledger export --format jsonl``."""
    from gateway.ledger_report import records

    paths = [candidate] + ([against] if against else [])
    policies = [load(p) for p in paths]
    total = Partial(tallies=[Tally() for _ in policies])
    chunk: list[tuple[int, bytes]] = []
    async for rec in records(client, since, until):
        chunk.append((len(chunk) + 1, msgspec.json.encode(rec)))
        if len(chunk) >= 20_000:
            _merge(total, run_lines(policies, chunk))
            chunk = []
    if chunk:
        _merge(total, run_lines(policies, chunk))
    return report(policies, total)


def simulate(candidate: str, traffic: str, against: str | None = None, *, progress: bool = False) -> dict[str, Any]:
    paths = [candidate] + ([against] if against else [])
    policies = [load(p) for p in paths]
    total = Partial(tallies=[Tally() for _ in policies])
    size = Path(traffic).stat().st_size
    processes = min(os.cpu_count() or 1, 8) if size > 4_000_000 else 1

    def merge(part: Partial) -> None:
        _merge(total, part, progress)

    if processes == 1:
        _init(paths)
        for chunk in _chunks(Path(traffic), 20_000):
            merge(run_lines(policies, chunk))
    else:
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(processes, initializer=_init, initargs=(paths,)) as pool:
            for part in pool.imap(_work, _chunks(Path(traffic), 20_000)):
                merge(part)
    return report(policies, total)


def _summary(policy: Policy, tally: Tally) -> dict[str, Any]:
    with localcontext(prec=60):  # exact sums of exact costs
        return _summarize(policy, tally)


def _summarize(policy: Policy, tally: Tally) -> dict[str, Any]:
    def cost(key: tuple[str, str]) -> Decimal:
        return policy.tiers[key[1]].price.cost(tally.input[key], tally.output[key])

    by_tier: dict[str, dict[str, Any]] = {}
    by_route: dict[str, dict[str, Any]] = {}
    for key in sorted(tally.requests):
        route, tier = key
        for group, name in ((by_tier, tier), (by_route, route)):
            row = group.setdefault(name, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": Decimal(0)})
            row["requests"] += tally.requests[key]
            row["input_tokens"] += tally.input[key]
            row["output_tokens"] += tally.output[key]
            row["cost_usd"] += cost(key)
    totals = {
        "requests": sum(tally.requests.values()),
        "input_tokens": sum(tally.input.values()),
        "output_tokens": sum(tally.output.values()),
        "cost_usd": sum((r["cost_usd"] for r in by_tier.values()), Decimal(0)),
        "unroutable": tally.unroutable,
    }
    return {
        "policy": policy.source,
        "revision": policy.revision,
        "by_tier": by_tier,
        "by_route": by_route,
        "totals": totals,
    }


def report(policies: list[Policy], total: Partial) -> dict[str, Any]:
    out: dict[str, Any] = {
        "lines": total.lines,
        "invalid_lines": total.invalid,
        "invalid_examples": total.invalid_examples,
        "shadow_lines": total.shadow,
        "output_tokens_from": dict(total.output_from),
        "candidate": _summary(policies[0], total.tallies[0]),
    }
    if len(policies) == 2:
        current = _summary(policies[1], total.tallies[1])
        out["current"] = current
        before, after = current["totals"]["cost_usd"], out["candidate"]["totals"]["cost_usd"]
        out["difference"] = {
            "cost_usd": after - before,
            "cost_pct": ((after - before) / before * 100).quantize(Decimal("0.01")) if before else None,
        }
        out["moved"] = [{"from": a, "to": b, "requests": n} for (a, b), n in total.moves.most_common()]
    return out


def money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.000001')):,}"


def render_table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['lines']:,} lines ({r['invalid_lines']:,} invalid); output tokens from: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(r["output_tokens_from"].items()))
    ]
    for e in r["invalid_examples"]:
        lines.append(f"  {e}")
    for label in ("current", "candidate"):
        if label not in r:
            continue
        s = r[label]
        lines += ["", f"{label}: {s['policy']} ({s['revision']})"]
        for group in ("by_tier", "by_route"):
            lines.append(
                f"  {'tier' if group == 'by_tier' else 'route':<18}{'requests':>12}{'input tok':>16}"
                f"{'output tok':>16}{'cost USD':>20}"
            )
            for name, row in s[group].items():
                lines.append(
                    f"  {name:<18}{row['requests']:>12,}{row['input_tokens']:>16,}{row['output_tokens']:>16,}"
                    f"{money(row['cost_usd']):>20}"
                )
        t = s["totals"]
        lines.append(
            f"  {'total':<18}{t['requests']:>12,}{t['input_tokens']:>16,}{t['output_tokens']:>16,}"
            f"{money(t['cost_usd']):>20}" + (f"   ({t['unroutable']:,} unroutable)" if t["unroutable"] else "")
        )
    if "difference" in r:
        d = r["difference"]
        pct = f" ({d['cost_pct']:+}%)" if d["cost_pct"] is not None else ""
        lines += ["", f"difference: {'+' if d['cost_usd'] >= 0 else '-'}${money(abs(d['cost_usd']))}{pct}"]
        for m in r["moved"]:
            lines.append(f"  moved {m['requests']:,} requests from route {m['from']} to {m['to']}")
    return "\n".join(lines) + "\n"
