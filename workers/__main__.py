"""``python -m workers``: worker tools.

sim          the vLLM-faithful simulator (same as ``python -m workers.sim``)
launch       one real vLLM worker for a tier, from a worker profile, registered in Redis
tiny-model   build a tiny random-weight model that real vLLM serves on CPU
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m workers COMMAND [ARGS]

  sim         --port N --model NAME [...]                 run the simulator
  launch      --profile FILE --tier T --port P [...]      run one vLLM worker and register it
  tiny-model  --out DIR --size small|frontier             build a tiny model (random weights)
"""


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in {"-h", "--help"}:
        print(USAGE, end="")
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "sim":
        from workers import sim

        sim.main(rest)
    elif command == "launch":
        from workers import launch

        launch.main(rest)
    elif command == "tiny-model":
        from workers import tiny_model

        tiny_model.main(rest)
    else:
        print(f"python -m workers: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
