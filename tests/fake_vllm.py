"""Stands in for ``python -m vllm.entrypoints.openai.api_server ...`` in the launcher's fast tests:
takes vLLM's arguments and runs the simulator with them (or, with FAKE_VLLM_FAIL set, fails to
start the way vLLM does: a traceback on its output and exit code 1)."""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]:
        argv = argv[2:]
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--served-model-name")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args, _unknown = ap.parse_known_args(argv)
    print(f"INFO fake vLLM: model={args.model} port={args.port}", flush=True)
    if os.environ.get("FAKE_VLLM_FAIL"):
        print("Traceback (most recent call last):", flush=True)
        print(f"OSError: cannot load model {args.model!r}", flush=True)
        raise SystemExit(1)
    from workers import sim

    name = args.served_model_name or args.model
    sim.main(
        ["--host", args.host, "--port", str(args.port), "--model", name, "--max-model-len", str(args.max_model_len)]
    )


if __name__ == "__main__":
    main()
