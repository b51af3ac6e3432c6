"""Redis stalled (DEBUG SLEEP) or killed and restarted under load: no false 429s, every counter back
to what the requests in flight explain within seconds, and the ledger equal to what the workers
did, request id by request id (the scenario is ``tests.load.redis_fault_under_load``, which
``python -m bench.faults`` also runs for its figures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.load import redis_fault_under_load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
LIMIT = 12


@pytest.mark.parametrize(
    ("fault", "mode"), [("stall", "fail_closed"), ("restart", "fail_open"), ("restart", "fail_closed")]
)
def test_counters_return_and_the_ledger_matches_after_a_redis_fault(tmp_path: Path, fault: str, mode: str) -> None:
    run = redis_fault_under_load(tmp_path, fault, mode, limit=LIMIT)
    assert run.codes[429] == 0, run.codes  # never more than LIMIT - 2 in flight: a 429 would be false
    assert run.codes[200] > 0
    if mode == "fail_open":
        assert set(run.codes) == {200}, run.codes
    else:
        assert set(run.codes) <= {200, 503}, run.codes
    assert run.slots_back_s < 5  # once traffic stops, every slot is accounted for within seconds
    assert run.full_limit == [200] * LIMIT + [429]  # ... and the tenant can use its whole limit at once
    assert set(run.ledger_ids) == set(run.worker_ids)  # one record per request a worker saw, nothing else
    assert max(run.ledger_ids.values()) == 1
    assert all(len(v) == 1 for v in run.worker_ids.values())  # no request was generated twice
