"""``python -m workers``: worker tools. ``sim`` runs the simulator (same as ``python -m workers.sim``)."""

from __future__ import annotations

import sys

from workers import sim


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in {"-h", "--help"}:
        print("usage: python -m workers sim --port N --model NAME [...]")
        raise SystemExit(0 if args else 2)
    if args[0] == "sim":
        sim.main(args[1:])
        return
    print(f"python -m workers: unknown command {args[0]!r}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
