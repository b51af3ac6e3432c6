"""Everything about the workers behind the gateway: a vLLM-compatible simulator for tests and
benchmarks (``workers.sim``); launching real vLLM workers comes with its own issue."""
