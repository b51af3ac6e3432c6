"""The ``gateway`` command.

    gateway serve --policy FILE [--host H] [--port P] [--workers N]   run the service
    gateway policy check FILE                                       validate a policy (exit 1 on problems)
    gateway policy apply FILE | history | diff V1 V2 | rollback V   change the live policy (Redis)
    gateway policy explain --policy FILE --request REQ.json         why a request goes where it goes
    gateway policy simulate --policy NEW --traffic FILE | --from-ledger [--against CURRENT]
    gateway policy suggest [--since D --until D --min-agreement X --min-samples N] --out FILE
    gateway keys create --tenant T [--label L] | list [--tenant T] | revoke ID
    gateway ledger report [--since D --until D --group-by ... --format ... --cost gpu] | export --format csv|jsonl
    gateway ledger verify | archive --to postgresql://... [--before D]   check; move records from Redis to Postgres
    gateway up [--sim] [--policy FILE] [--workers FILE] [--port P]  Redis + workers + gateway, one command

Settings come from ``GATEWAY_*`` environment variables; flags override them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from gateway.errors import GatewayError
from gateway.policy import PolicyError, load
from gateway.policy.store import PolicyStore
from gateway.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway import edge

    try:
        settings = Settings.from_env(
            policy=args.policy, host=args.host, port=args.port, workers=args.workers, watch=args.watch or None
        )
        load(settings.policy)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"gateway serve: {exc}", file=sys.stderr)
        return 2
    problem = _metrics_port_problem(settings)
    if problem:
        print(f"gateway serve: {problem}", file=sys.stderr)
        return 2
    common = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": edge.protocol(settings),  # uvicorn's httptools protocol with bounded heads and deadlines
        "timeout_keep_alive": settings.keepalive_s,
        "access_log": False,
        # nothing reads the client address or scheme from the scope: uvicorn's X-Forwarded-* middleware
        # (about 1% of the CPU per request) would only rewrite what nobody looks at
        "proxy_headers": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "backlog": 4096,
    }
    if settings.workers > 1:
        import tempfile

        os.environ.update(settings.as_env())  # each worker process rebuilds Settings from these
        if not settings.metrics_dir:  # prometheus-client's multiprocess mode: one fresh directory per start
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
    else:
        from gateway.app import create_app

        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
    return 0


def _metrics_port_problem(settings: Settings) -> str | None:
    """Why the metrics listener could not bind, said before any process starts (with ``--workers N``
    a process failing its start-up would otherwise be restarted over and over)."""
    import socket

    if not settings.metrics_port:
        return None
    try:
        infos = socket.getaddrinfo(settings.metrics_host, settings.metrics_port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if settings.workers > 1:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        return (
            f"cannot listen for metrics on {settings.metrics_host}:{settings.metrics_port}: {exc} "
            "(GATEWAY_METRICS_PORT; 0 turns the metrics listener off)"
        )
    return None


def _policy_check(args: argparse.Namespace) -> int:
    try:
        policy = load(args.file)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(policy.tiers)} tiers, {len(policy.routes)} routes, sha256 {policy.sha256[:12]})")
    return 0


def _with_store(action: str, run: Callable[[PolicyStore], Awaitable[int]]) -> int:
    """Run ``run`` against the policy store in Redis ($GATEWAY_REDIS_URL); no gateway needed."""
    import asyncio

    import redis.exceptions

    from gateway import store

    settings = Settings.from_env()

    async def go() -> int:
        client = store.connect(settings.redis_url, timeout_s=5, mode=settings.redis_mode)
        try:
            return await run(PolicyStore(client))
        except (redis.exceptions.RedisError, OSError) as exc:
            print(f"gateway policy {action}: cannot reach Redis at {settings.redis_url}: {exc}", file=sys.stderr)
            return 2
        finally:
            await client.aclose()

    return asyncio.run(go())


def _author(given: str | None) -> str:
    import getpass

    return given or Settings.from_env().author or getpass.getuser()


def _policy_apply(args: argparse.Namespace) -> int:
    try:
        text = open(args.file, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        print(f"{args.file}:1: cannot read policy: {exc}", file=sys.stderr)
        return 1
    if args.ramp:  # a staged rollout with a guard (gateway/policy/ramp.py)
        from gateway.evidence_cli import apply_ramp

        return apply_ramp(args, text, _author(args.author))

    async def run(store: PolicyStore) -> int:
        try:
            version, changed = await store.apply(
                text, source=args.file, author=_author(args.author), message=args.message or ""
            )
        except PolicyError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return 1
        if changed:
            print(
                f"applied {args.file} as v{version.version} (sha256 {version.sha256[:12]}); replicas follow within 1 s"
            )
        else:
            print(f"{args.file} is already the active policy (v{version.version}); nothing changed")
        return 0

    return _with_store("apply", run)


def _policy_history(args: argparse.Namespace) -> int:
    import datetime

    async def run(store: PolicyStore) -> int:
        active = await store.active()
        print(f"{'VERSION':<8} {'TIME (UTC)':<20} {'AUTHOR':<16} {'FROM':<6} {'SHA256':<13} MESSAGE")
        for v in await store.history():
            when = datetime.datetime.fromtimestamp(v.time, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
            mark = "*" if active and active.version == v.version else " "
            prev = f"v{v.previous}" if v.previous else "-"
            print(f"{mark}v{v.version:<6} {when:<20} {v.author:<16} {prev:<6} {v.sha256[:12]:<13} {v.message}")
        return 0

    return _with_store("history", run)


def _policy_diff(args: argparse.Namespace) -> int:
    async def run(store: PolicyStore) -> int:
        try:
            sys.stdout.write(await store.diff(args.v1, args.v2) or "(no difference)\n")
        except KeyError as exc:
            print(f"gateway policy diff: no version {exc.args[0]}", file=sys.stderr)
            return 1
        return 0

    return _with_store("diff", run)


def _policy_rollback(args: argparse.Namespace) -> int:
    async def run(store: PolicyStore) -> int:
        try:
            new = await store.rollback(args.version, author=_author(args.author))
        except KeyError:
            print(f"gateway policy rollback: no version {args.version}", file=sys.stderr)
            return 1
        print(f"rolled back to v{args.version}'s policy as v{new.version}")
        return 0

    return _with_store("rollback", run)


def _policy_explain(args: argparse.Namespace) -> int:
    import json

    import msgspec

    from gateway.policy.explain import explain, render_text
    from gateway.policy.simulate import facts_of

    try:
        policy = load(args.policy)
        line = json.loads(open(args.request, encoding="utf-8").read())  # noqa: SIM115
        if args.tenant:
            line = {"body": line.get("body", line), "tenant": args.tenant, "headers": line.get("headers", {})}
        facts, _ = facts_of(line)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except (OSError, ValueError, GatewayError) as exc:
        print(f"gateway policy explain: {args.request}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    result = explain(policy, facts)
    if args.format == "json":
        print(msgspec.json.encode(result).decode())
    else:
        sys.stdout.write(render_text(result))
    return 0


def _policy_simulate(args: argparse.Namespace) -> int:
    import msgspec

    from gateway.policy.simulate import render_table, simulate

    try:
        if args.from_ledger:
            from gateway.evidence_cli import simulate_from_ledger

            result = simulate_from_ledger(args)
        elif args.traffic is None:
            print("gateway policy simulate: give --traffic FILE or --from-ledger", file=sys.stderr)
            return 2
        else:
            result = simulate(args.policy, args.traffic, args.against, progress=True)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"gateway policy simulate: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(msgspec.json.encode(result, enc_hook=str).decode())
    else:
        sys.stdout.write(render_table(result))
    return 0


def _policy_suggest(args: argparse.Namespace) -> int:
    from gateway.evidence_cli import suggest

    return suggest(args)


def _ledger(args: argparse.Namespace) -> int:
    import asyncio
    import csv

    import msgspec
    import redis.exceptions

    from gateway import ledger_report, store
    from gateway.archive import ArchiveUnavailable
    from gateway.ledger import LedgerRecord

    settings = Settings.from_env()

    async def run() -> int:
        client = store.connect(settings.redis_url, timeout_s=10, mode=settings.redis_mode)
        try:
            archive = getattr(args, "archive", None) or settings.ledger_archive_url
            if args.ledger_command == "archive":
                return await _ledger_archive(args, client)
            if args.ledger_command == "report" and args.cost == "gpu":
                return await _gpu_report(args, client, archive, settings)
            if args.ledger_command == "report":
                group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
                if "task" in group_by:  # the per-task profile, and with tier the shadow agreement
                    from gateway import evidence

                    tasks = await evidence.task_report(client, group_by, args.since, args.until)
                    sys.stdout.write(evidence.render(tasks, args.format))
                    return 0
                rows = await ledger_report.report(client, group_by, args.since, args.until, archive=archive)
                sys.stdout.write(ledger_report.render(rows, group_by, args.format))
            elif args.ledger_command == "export":
                columns = list(LedgerRecord.__struct_fields__)
                writer = csv.writer(sys.stdout, lineterminator="\n")
                if args.format == "csv":
                    writer.writerow(columns)
                async for rec in _records(client, archive, args.since, args.until):
                    if args.format == "csv":
                        writer.writerow(["" if getattr(rec, c) is None else getattr(rec, c) for c in columns])
                    else:
                        sys.stdout.write(msgspec.json.encode(rec).decode() + "\n")
            elif args.ledger_command == "reconcile":
                return await _reconcile(args, client, settings)
            else:
                problems = await _verify(client, archive)
                if problems:
                    print("\n".join(problems))
                    return 1
                print("ok: the aggregates equal the sum of the records")
            return 0
        except ValueError as exc:
            print(f"gateway ledger: {exc}", file=sys.stderr)
            return 2
        except (redis.exceptions.RedisError, OSError) as exc:
            print(f"gateway ledger: cannot reach Redis at {settings.redis_url}: {exc}", file=sys.stderr)
            return 2
        except ArchiveUnavailable as exc:
            print(f"gateway ledger: the archive in Postgres: {exc}", file=sys.stderr)
            return 2
        finally:
            await client.aclose()

    return asyncio.run(run())


def _records(client: Any, archive: str | None, since: str | None, until: str | None) -> AsyncIterator[Any]:
    from gateway import ledger_report

    if archive is None:
        return ledger_report.records(client, since, until)
    from gateway.archive import reader

    return reader.records(client, archive, since, until)


async def _verify(client: Any, archive: str | None) -> list[str]:
    from gateway import ledger_report

    if archive is None:
        return await ledger_report.verify(client)
    from gateway.archive import reader

    return await reader.verify(client, archive)


async def _ledger_archive(args: argparse.Namespace, client: Any) -> int:
    import time

    from gateway.archive import archiver
    from gateway.ledger_report import check_day

    before = None if args.all else (args.before or archiver.today())
    check_day(before, "--before")
    started = time.monotonic()
    try:
        p = await archiver.archive(client, args.to, before, batch=args.batch)
    except archiver.Busy as exc:
        print(f"gateway ledger archive: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    print(
        f"archived {p.read:,} records ({p.new:,} new to the archive) in {took:.1f} s"
        f"{f' before {before}' if before else ''}; trimmed {p.trimmed:,} from Redis, up to stream id {p.last_id}"
    )
    if p.deferred:
        print("the last batch's trim waited too long for readers: it is archived and will be trimmed next run")
    return 0


async def _gpu_report(args: argparse.Namespace, client: Any, archive: str | None, settings: Settings) -> int:
    from gateway import gpu_cost

    policy = load(args.policy or settings.policy)
    report = await gpu_cost.report(client, policy, args.since, args.until, archive=archive)
    sys.stdout.write(gpu_cost.render(report, args.format))
    return 0


async def _reconcile(args: argparse.Namespace, client: Any, settings: Settings) -> int:
    from gateway import reconcile

    if args.mark:
        workers = list(args.worker or [])
        if not workers:
            policy = load(args.policy or settings.policy)
            workers = [w for tier in policy.tiers.values() for w in tier.workers]
        m = await reconcile.mark(client, workers)
        print(f"marked {len(m.workers)} workers at {m.time:.0f}; run `gateway ledger reconcile` later to compare")
        return 0
    try:
        m, rows = await reconcile.compare(client)
    except LookupError as exc:
        print(f"gateway ledger reconcile: {exc}", file=sys.stderr)
        return 1
    print(f"since the mark at {m.time:.0f}:")
    print(f"{'WORKER':<32} {'WORKER PROMPT':>14} {'BILLED PROMPT':>14} {'WORKER GEN':>12} {'BILLED COMPL':>13}  STATUS")
    for r in rows:
        wp = "unreachable" if r.worker_prompt_tokens is None else f"{r.worker_prompt_tokens:,.0f}"
        wg = "-" if r.worker_generation_tokens is None else f"{r.worker_generation_tokens:,.0f}"
        status = "ok" if r.matches else "DIFFERENT"
        billed = f"{r.billed_prompt_tokens:>14,} {wg:>12} {r.billed_completion_tokens:>13,}"
        print(f"{r.worker:<32} {wp:>14} {billed}  {status}")
    return 0 if all(r.matches for r in rows) else 1


def _keys(args: argparse.Namespace) -> int:
    import asyncio
    import datetime

    import redis.exceptions

    from gateway import store
    from gateway.keys import KeyStore

    settings = Settings.from_env()

    async def run() -> int:
        client = store.connect(settings.redis_url, timeout_s=5, mode=settings.redis_mode)
        keys = KeyStore(client)
        try:
            if args.keys_command == "create":
                _, secret = await keys.create(args.tenant, args.label or "")
                print(secret)
            elif args.keys_command == "list":
                rows = await keys.list(args.tenant)
                fmt = "{:<18} {:<16} {:<20} {:<20} {:<20} {}"
                print(fmt.format("ID", "TENANT", "LABEL", "CREATED", "LAST USED", "STATUS"))

                def when(t: float | None) -> str:
                    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if t else "-"

                for k in rows:
                    status = "revoked" if k.revoked else "active"
                    print(fmt.format(k.id, k.tenant, k.label or "-", when(k.created), when(k.last_used), status))
            elif not await keys.revoke(args.id):
                print(f"gateway keys revoke: no key {args.id!r}", file=sys.stderr)
                return 1
            else:
                print(f"revoked {args.id}")
            return 0
        except (redis.exceptions.RedisError, OSError) as exc:
            print(f"gateway keys: cannot reach Redis at {settings.redis_url}: {exc}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"gateway keys: {exc}", file=sys.stderr)
            return 2
        finally:
            await client.aclose()

    return asyncio.run(run())


def _up(args: argparse.Namespace) -> int:
    from gateway.settings import named
    from gateway.up import up

    return up(
        policy=args.policy,
        host=args.host,
        port=args.port,
        sim=args.sim,
        workers_file=args.workers,
        redis_url=args.redis or named("redis_url"),
        env_file=args.env_file,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A multi-tier routing inference gateway in front of vLLM workers.",
        epilog="Settings also come from GATEWAY_* environment variables (GATEWAY_POLICY, GATEWAY_PORT, "
        "GATEWAY_REDIS_URL, GATEWAY_ADMIN_TOKEN, GATEWAY_MAX_BODY_BYTES, GATEWAY_LOG_FORMAT, ...); "
        "flags override them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the gateway", description="Run the gateway's HTTP service.")
    serve.add_argument("--policy", help="routing policy YAML (default: $GATEWAY_POLICY)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--workers", type=int, help="gateway processes (default 1)")
    serve.add_argument(
        "--watch", action="store_true", help="reload the policy file when it changes (invalid edits are refused)"
    )
    serve.set_defaults(func=_serve)

    policy = sub.add_parser("policy", help="work with routing policies", description="Work with routing policies.")
    psub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    check = psub.add_parser(
        "check",
        help="validate a policy file",
        description="Validate a policy. Prints every problem as FILE:LINE: message and exits 1, or exits 0.",
    )
    check.add_argument("file", help="policy YAML")
    check.set_defaults(func=_policy_check)

    apply = psub.add_parser(
        "apply",
        help="validate a policy and make it active on every replica",
        description="Validate FILE and, if valid, store it in Redis as a new version and tell every replica "
        "(they switch within 1 s). An invalid policy is refused with every FILE:LINE: message; nothing changes.",
    )
    apply.add_argument("file", help="policy YAML")
    apply.add_argument("--author", help="who is applying it (default $GATEWAY_AUTHOR or your user name)")
    apply.add_argument("--message", "-m", help="why")
    apply.add_argument(
        "--ramp",
        metavar="PCTS",
        help="staged rollout: the routes whose tier changes get PCTS%% of their traffic in turn (e.g. 10,50,100), "
        "rolled back by itself if the guard fails",
    )
    apply.add_argument("--step-seconds", type=float, default=60.0, help="with --ramp: how long each step lasts")
    apply.add_argument(
        "--step-samples", type=int, default=0, help="with --ramp: shadow comparisons a step needs before the next"
    )
    apply.add_argument(
        "--guard-agreement", type=float, default=0.9, help="with --ramp: roll back when agreement is below this"
    )
    apply.add_argument(
        "--guard-error-rate", type=float, default=0.05, help="with --ramp: roll back when errors are above this"
    )
    apply.add_argument(
        "--guard-min-samples", type=int, default=10, help="with --ramp: comparisons before the guard judges"
    )
    apply.set_defaults(func=_policy_apply)
    hist = psub.add_parser("history", help="list policy versions", description="Every applied version; * is active.")
    hist.set_defaults(func=_policy_history)
    diff = psub.add_parser("diff", help="diff two versions", description="Unified diff between two stored versions.")
    diff.add_argument("v1", type=int)
    diff.add_argument("v2", type=int)
    diff.set_defaults(func=_policy_diff)
    rb = psub.add_parser(
        "rollback",
        help="make an earlier version active again",
        description="Re-apply version V's policy as a new version (the audit trail keeps both).",
    )
    rb.add_argument("version", type=int)
    rb.add_argument("--author")
    rb.set_defaults(func=_policy_rollback)
    ex = psub.add_parser(
        "explain",
        help="show how a request would be routed",
        description="Every route in order with each condition and whether it held, the route that matched, the "
        "tier, the fallbacks, the token estimate and the estimated cost. REQ.json is a request body, or "
        '{"body": ..., "tenant": ..., "headers": {...}}.',
    )
    ex.add_argument("--policy", required=True)
    ex.add_argument("--request", required=True, metavar="REQ.json")
    ex.add_argument("--tenant")
    ex.add_argument("--format", choices=["text", "json"], default="text")
    ex.set_defaults(func=_policy_explain)
    sim = psub.add_parser(
        "simulate",
        help="predict what a policy does to traffic and cost",
        description="Replay a traffic file (JSONL of request bodies, optionally with tenant/headers, or a ledger "
        "export) through the routing decision — no worker is called — and report requests, tokens and cost per tier "
        "and per route, the totals, and with --against the difference and which requests moved.",
    )
    sim.add_argument("--policy", required=True, metavar="CANDIDATE.yaml")
    sim.add_argument("--traffic", metavar="FILE")
    sim.add_argument(
        "--from-ledger", action="store_true", help="replay the traffic the ledger recorded ($GATEWAY_REDIS_URL)"
    )
    sim.add_argument("--since", metavar="YYYY-MM-DD", help="with --from-ledger: first day (UTC), inclusive")
    sim.add_argument("--until", metavar="YYYY-MM-DD", help="with --from-ledger: last day (UTC), inclusive")
    sim.add_argument("--against", metavar="CURRENT.yaml")
    sim.add_argument("--format", choices=["table", "json"], default="table")
    sim.set_defaults(func=_policy_simulate)
    sug = psub.add_parser(
        "suggest",
        help="propose a cheaper policy from the ledger's shadow comparisons",
        description="Read the recorded traffic and shadow comparisons (the ledger) and write a candidate policy "
        "to FILE that moves each task whose agreement's lower bound (95%% Wilson) is at least --min-agreement over "
        "at least --min-samples comparisons to the cheaper tier, with the old tier as fallback; print the evidence "
        "per task and the predicted daily saving on the same traffic.",
    )
    sug.add_argument("--since", metavar="YYYY-MM-DD")
    sug.add_argument("--until", metavar="YYYY-MM-DD")
    sug.add_argument("--min-agreement", type=float, default=0.95)
    sug.add_argument("--min-samples", type=int, default=30)
    sug.add_argument("--policy", metavar="CURRENT.yaml", help="the current policy (default: the active version)")
    sug.add_argument("--out", required=True, metavar="FILE")
    sug.set_defaults(func=_policy_suggest)

    keys = sub.add_parser(
        "keys",
        help="manage API keys (talks to Redis directly)",
        description="Manage API keys in Redis ($GATEWAY_REDIS_URL); no gateway needs to be running.",
    )
    ksub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    kc = ksub.add_parser(
        "create",
        help="create a key; prints the secret alone on one line",
        description="Create a key for a tenant. The secret is printed once and never stored.",
    )
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--label", help="a note for people: what the key is for")
    kl = ksub.add_parser(
        "list",
        help="list keys (never the secrets)",
        description="List keys: id, tenant, label, created, last used, status. Secrets are never shown.",
    )
    kl.add_argument("--tenant", help="only this tenant's keys")
    kr = ksub.add_parser(
        "revoke", help="revoke a key", description="Revoke a key; every replica refuses it within 1 s."
    )
    kr.add_argument("id", help="the key id (from `gateway keys list`)")
    keys.set_defaults(func=_keys)

    ledger = sub.add_parser(
        "ledger",
        help="cost reports, exports and checks (talks to Redis directly)",
        description="Read the cost ledger in Redis ($GATEWAY_REDIS_URL); no gateway needs to be running.",
    )
    lsub = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)
    lr = lsub.add_parser(
        "report",
        help="totals grouped by day, tenant, tier, route, model",
        description="Requests, tokens and exact cost from the per-day aggregates.",
    )
    le = lsub.add_parser(
        "export",
        help="every record, streamed (constant memory)",
        description="Stream every ledger record to stdout as CSV or JSON lines.",
    )
    for p in (lr, le):
        p.add_argument("--since", metavar="YYYY-MM-DD", help="first day (UTC), inclusive")
        p.add_argument("--until", metavar="YYYY-MM-DD", help="last day (UTC), inclusive")
    lr.add_argument(
        "--group-by",
        default="day,tenant,tier",
        help="comma-separated: day, tenant, tier, route, model, task (task: mean/p95 tokens per request and "
        "share of cost; task,tier: also the shadow agreement and what moving would save)",
    )
    lr.add_argument("--format", choices=["table", "csv", "json"], default="table")
    lr.add_argument(
        "--cost",
        choices=["tokens", "gpu"],
        default="tokens",
        help="tokens: per-token prices (default); gpu: GPU-hours of the tiers priced by gpu_hour, per tenant and idle",
    )
    lr.add_argument("--policy", help="with --cost gpu: the policy with the gpu_hour prices (default $GATEWAY_POLICY)")
    le.add_argument("--format", choices=["csv", "jsonl"], required=True)
    lv = lsub.add_parser(
        "verify",
        help="check the aggregates equal the sum of the records",
        description="Re-add every record and compare with the aggregates; exit 1 on any difference.",
    )
    for p in (lr, le, lv):
        p.add_argument(
            "--archive",
            metavar="postgresql://...",
            help="read the ledger's Postgres archive beside Redis (default $GATEWAY_LEDGER_ARCHIVE_URL)",
        )
    la = lsub.add_parser(
        "archive",
        help="move records from Redis to Postgres",
        description="Copy ledger records from the Redis stream into Postgres in batches (COPY), exactly once by "
        "request id, then trim from Redis what Postgres acknowledged. Reports, exports and verify with --archive "
        "give the same totals afterwards.",
    )
    la.add_argument("--to", required=True, metavar="postgresql://...", help="the archive database")
    la.add_argument("--before", metavar="YYYY-MM-DD", help="archive records of days before this one (default: today)")
    la.add_argument("--all", action="store_true", help="archive every record, today's too")
    la.add_argument("--batch", type=int, default=5000, help="records per COPY transaction (default 5000)")
    rc = lsub.add_parser(
        "reconcile",
        help="compare billed tokens with the workers' own counters",
        description="With --mark: snapshot every worker's vllm:prompt_tokens_total and vllm:generation_tokens_total. "
        "Without: per worker, compare the counters' growth since the mark with the tokens the ledger billed on it "
        "since then (exit 1 on any difference).",
    )
    rc.add_argument("--mark", action="store_true", help="take the snapshot to compare against later")
    rc.add_argument("--policy", help="the policy whose workers to mark (default $GATEWAY_POLICY)")
    rc.add_argument("--worker", action="append", help="a worker URL to mark (repeatable; instead of --policy)")
    ledger.set_defaults(func=_ledger)

    upp = sub.add_parser(
        "up",
        help="bring up workers and the gateway locally",
        description="Start a Redis of its own (or use the one named by --redis / GATEWAY_REDIS_URL), one worker "
        "per loopback worker URL of the policy (real vLLM from the worker profiles beside it, or simulators "
        "with --sim), then the gateway; create an API key and print the endpoint. Ctrl-C stops everything.",
    )
    upp.add_argument("--sim", action="store_true", help="simulator workers instead of vLLM (starts in seconds)")
    upp.add_argument("--policy", help="policy YAML (default policies/local.yaml; with --sim, policies/sim.yaml)")
    upp.add_argument("--workers", help="worker profiles (default: NAME.workers.yaml beside the policy NAME.yaml)")
    upp.add_argument("--host", default="127.0.0.1")
    upp.add_argument("--port", type=int, default=8080)
    upp.add_argument(
        "--redis",
        metavar="URL",
        help="use this Redis (default: GATEWAY_REDIS_URL if set, else a redis-server of its own, data in .run/redis)",
    )
    upp.add_argument("--env-file", metavar="FILE", help="also write the export lines (URL, API key, Redis) here")
    upp.set_defaults(func=_up)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
