"""Everything about the workers behind the gateway: profiles per tier (``workers.profile``),
launching real vLLM workers (``python -m workers launch``), tiny deterministic models
(``workers.tiny_model``) and a vLLM-compatible simulator for tests and benchmarks (``workers.sim``)."""
