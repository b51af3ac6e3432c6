"""The evidence commands of ``gateway``: ``policy suggest``, ``policy simulate --from-ledger`` and
``policy apply --ramp`` (``gateway/cli.py`` parses their flags and calls these)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.exceptions

from gateway import evidence, store
from gateway.ledger import DAYS
from gateway.ledger_report import _days, _text
from gateway.policy import PolicyError, load
from gateway.policy.store import PolicyStore
from gateway.settings import Settings


def _client() -> Any:
    return store.connect(Settings.from_env().redis_url, timeout_s=10)


async def _current_text(client: Any, path: str | None) -> tuple[str, str]:
    """The current policy's text and name: ``--policy FILE``, else the active version in Redis."""
    if path:
        return await asyncio.to_thread(Path(path).read_text, encoding="utf-8"), path
    active = await PolicyStore(client).active()
    if active is None:
        raise LookupError("no policy is active in Redis: name the current one with --policy FILE")
    return active.yaml, f"v{active.version}"


def _temp(text: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="gateway-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def simulate_from_ledger(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.policy.simulate import simulate_ledger

    async def go() -> dict[str, Any]:
        client = _client()
        try:
            return await simulate_ledger(client, args.policy, args.against, args.since, args.until)
        except redis.exceptions.RedisError as exc:
            raise OSError(f"cannot read the ledger: {exc}") from None
        finally:
            await client.aclose()

    return asyncio.run(go())


def _command(action: str, work: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``work(redis client)``; its failures become messages and exit codes (1: refused, 2: Redis)."""

    async def go() -> int:
        client = _client()
        try:
            return await work(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except redis.exceptions.RedisError as exc:
        print(f"gateway policy {action}: cannot reach Redis: {exc}", file=sys.stderr)
        return 2
    except (LookupError, OSError, ValueError) as exc:
        print(f"gateway policy {action}: {exc}", file=sys.stderr)
        return 1


def suggest(args: argparse.Namespace) -> int:
    from gateway.policy import suggest as sg
    from gateway.policy.simulate import simulate_ledger

    async def work(client: Any) -> int:
        text, name = await _current_text(client, args.policy)
        current_path = _temp(text)
        try:
            current = load(current_path)
            report = await evidence.task_report(client, ["task", "tier", "route"], args.since, args.until)
            moves = sg.judge(current, report["rows"], args.min_agreement, args.min_samples)
            served: dict[str, set[str]] = {}
            for row in report["rows"]:
                served.setdefault(row["route"], set()).add(row["task"])
            head = sg.header(moves, args.since, args.until, args.min_agreement, args.min_samples)
            out = sg.candidate(text, current, moves, served, head)
            await asyncio.to_thread(Path(args.out).write_text, out, encoding="utf-8")
            result = await simulate_ledger(client, args.out, current_path, args.since, args.until)
        finally:
            os.unlink(current_path)
        days = len(_days(args.since, args.until, [_text(d) for d in await client.smembers(DAYS)])) or 1
        moved = [m for m in moves if m.moves]
        print(f"evidence from the ledger (current policy {name}; {days} day(s) of traffic):")
        sys.stdout.write(sg.render(moves) if moves else "  no shadow comparisons recorded\n")
        before = result["current"]["totals"]["cost_usd"]
        after = result["candidate"]["totals"]["cost_usd"]
        per_day = (before - after) / days
        q = Decimal("0.01")
        print(
            f"predicted: ${before / days:.2f}/day now, ${after / days:.2f}/day with the candidate: "
            f"saves ${per_day.quantize(q)}/day ({abs(result['difference']['cost_pct'] or 0)}% of the cost) "
            f"on the recorded traffic ({result['lines']:,} requests)"
        )
        tasks = ", ".join(f"{m.task} -> {m.to_tier}" for m in moved) or "nothing"
        print(f"wrote {args.out}: moves {tasks}; check it with `gateway policy check {args.out}`")
        return 0

    return _command("suggest", work)


def apply_ramp(args: argparse.Namespace, text: str, author: str) -> int:
    from gateway.policy.ramp import Guard, ramp

    try:
        shares = [int(s) for s in args.ramp.split(",") if s.strip()]
    except ValueError:
        print(f"gateway policy apply: --ramp takes percentages like 10,50,100, not {args.ramp!r}", file=sys.stderr)
        return 2
    if not shares or any(not 0 < s <= 100 for s in shares) or shares != sorted(shares):
        print("gateway policy apply: --ramp takes rising percentages in 1..100, e.g. 10,50,100", file=sys.stderr)
        return 2
    guard = Guard(
        args.guard_agreement,
        args.guard_error_rate,
        args.step_seconds,
        args.step_samples,
        min_samples=args.guard_min_samples,
    )

    async def work(client: Any) -> int:
        store = PolicyStore(client)
        outcome = await ramp(
            store, text, source=args.file, author=author, message=args.message or "", shares=shares, guard=guard
        )
        if outcome.completed:
            print(f"ramp complete: {args.file} is active at 100% (versions {', '.join(map(str, outcome.steps))})")
            return 0
        print(f"ramp rolled back: {outcome.reason}", file=sys.stderr)
        return 3

    return _command("apply", work)
