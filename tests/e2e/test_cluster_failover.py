"""A primary of the Redis Cluster fails over under load: the gateway follows the slot map to the
promoted replica, the rate limit holds, every answered request is billed exactly once (what could
not be written waited in the spool), and no concurrency slot is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.load import cluster_failover_under_load
from tests.procs import ClusterServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_primary_failover_under_load_loses_no_record_and_keeps_the_limit(
    tmp_path: Path, redis_cluster: ClusterServer
) -> None:
    run = cluster_failover_under_load(tmp_path, redis_cluster, "failover")
    assert run.promoted_s < 10
    assert run.capped_admitted <= run.capped_bound  # fail_closed: the limit is never exceeded
    assert run.codes["200"] > 20 and run.codes["429 rate_limit_exceeded"] > 0, run.codes  # the limit was reached
    # nothing but 200, 429 and (while the slots moved) 503 state_unavailable
    assert set(run.codes) <= {"200", "429 rate_limit_exceeded", "503 state_unavailable"}, run.codes
    if run.errors_until_s is not None:
        assert run.errors_until_s < run.promoted_s + 3.0  # served again soon after the switch
    assert run.spool_left == 0
    assert run.answered_ids <= set(run.ledger_ids)  # 0 records lost
    assert set(run.ledger_ids) == run.worker_ids  # billed = what the worker served
    assert max(run.ledger_ids.values()) == 1  # none twice
    assert run.slots_back_s < 5
