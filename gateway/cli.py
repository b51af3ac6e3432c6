"""The ``gateway`` command.

    gateway serve --policy FILE [--host H] [--port P] [--workers N]   run the service
    gateway policy check FILE                                       validate a policy (exit 1 on problems)
    gateway keys create --tenant T [--label L] | list [--tenant T] | revoke ID
    gateway up --sim [--policy FILE] [--port P]                     simulator workers + gateway, one command

Settings come from ``GATEWAY_*`` environment variables; flags override them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway.policy import PolicyError, load
from gateway.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        settings = Settings.from_env(policy=args.policy, host=args.host, port=args.port, workers=args.workers)
        load(settings.policy)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"gateway serve: {exc}", file=sys.stderr)
        return 2
    common = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": 30,
        "backlog": 4096,
    }
    if settings.workers > 1:
        import os

        os.environ.update(settings.as_env())  # each worker process rebuilds Settings from these
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
    else:
        from gateway.app import create_app

        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    try:
        policy = load(args.file)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(policy.tiers)} tiers, {len(policy.routes)} routes, sha256 {policy.sha256[:12]})")
    return 0


def _keys(args: argparse.Namespace) -> int:
    import asyncio
    import datetime

    import redis.exceptions

    from gateway import store
    from gateway.keys import KeyStore

    settings = Settings.from_env()

    async def run() -> int:
        client = store.connect(settings.redis_url, timeout_s=5)
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
    from gateway.up import up

    return up(policy=args.policy, host=args.host, port=args.port, sim=args.sim)


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

    upp = sub.add_parser(
        "up",
        help="bring up workers and the gateway locally",
        description="Start simulator workers for every worker URL of the policy, then the gateway; "
        "print the endpoint. Ctrl-C stops everything.",
    )
    upp.add_argument("--sim", action="store_true", help="use simulator workers (the only kind for now)")
    upp.add_argument("--policy", default="policies/sim.yaml", help="policy YAML (default policies/sim.yaml)")
    upp.add_argument("--host", default="127.0.0.1")
    upp.add_argument("--port", type=int, default=8080)
    upp.set_defaults(func=_up)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
