"""`gateway ledger archive` as operators run it, against a real redis-server and PostgreSQL: the
reports, exports and verify say the same before and after, also when the archiver is killed (-9)
at random moments; and the gateway's background sink (GATEWAY_LEDGER_ARCHIVE_URL)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from gateway.ledger import STREAM, Ledger
from gateway.resp import RespConnection
from gateway.store import connect
from tests import pg
from tests.procs import ROOT, Gateway, RedisServer, gateway_cli, two_tier_policy
from tests.unit.test_archive import mixed

# Each CLI run starts Python anew (about a second on a quiet machine, many more on a loaded one).
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    server = RedisServer(tmp_path)
    try:
        with pg.database() as url:
            yield server, url
    finally:
        server.stop()


def write(redis_url: str, tmp: Path, n: int) -> None:
    async def go() -> None:
        resp = RespConnection(redis_url, timeout_s=5)
        ledger = Ledger(resp, str(tmp))
        records = mixed(n)
        for i in range(0, n, 2000):
            await ledger.write(records[i : i + 2000])
        await resp.close()

    asyncio.run(go())


def stream_length(redis_url: str) -> int:
    async def go() -> int:
        client = connect(redis_url, timeout_s=5)
        try:
            return int(await client.xlen(STREAM))
        finally:
            await client.aclose()

    return asyncio.run(go())


def views(env: dict[str, str]) -> list[str]:
    """What finance reads, as the CLI prints it."""
    return [
        gateway_cli(env, "ledger", "report", "--group-by", "day,tenant,tier,route,model", check=True).stdout,
        gateway_cli(env, "ledger", "report", "--group-by", "tenant", "--format", "json", check=True).stdout,
        gateway_cli(env, "ledger", "export", "--format", "csv", "--since", "2026-11-19", check=True).stdout,
        gateway_cli(env, "ledger", "verify", check=True).stdout,
    ]


def test_cli_archive_keeps_every_total(stores: tuple[RedisServer, str], tmp_path: Path) -> None:
    redis_server, url = stores
    write(redis_server.url, tmp_path, 900)
    env = {"GATEWAY_REDIS_URL": redis_server.url}
    before = views(env)
    assert "total: 900 requests" in before[0]

    done = gateway_cli(env, "ledger", "archive", "--to", url, "--before", "2026-11-20", "--batch", "128", check=True)
    assert done.stdout.startswith("archived 600 records (600 new to the archive) in ")
    assert done.stdout.rstrip().endswith("before 2026-11-20; trimmed 600 from Redis, up to stream id " + last_id(url))
    assert stream_length(redis_server.url) == 300
    assert views({**env, "GATEWAY_LEDGER_ARCHIVE_URL": url}) == before
    alone = gateway_cli(env, "ledger", "report", check=True).stdout
    assert "total: 300 requests" in alone  # without the archive, Redis alone has what is left
    flag = gateway_cli(env, "ledger", "report", "--group-by", "day,tenant,tier,route,model", "--archive", url)
    assert flag.stdout == before[0]

    bad = gateway_cli(env, "ledger", "report", "--archive", "postgresql://postgres@127.0.0.1:1/none")
    assert bad.returncode == 2
    assert bad.stderr.startswith("gateway ledger: the archive in Postgres: ")
    bad_day = gateway_cli(env, "ledger", "archive", "--to", url, "--before", "yesterday")
    assert (bad_day.returncode, bad_day.stderr) == (
        2,
        "gateway ledger: --before must be a day as YYYY-MM-DD, not 'yesterday'\n",
    )


def last_id(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT last_ms, last_seq FROM ledger_archive_state").fetchone()
        assert row is not None
        return f"{row[0]}-{row[1]}"


def test_archiver_killed_at_random_moments_loses_and_doubles_nothing(
    stores: tuple[RedisServer, str], tmp_path: Path
) -> None:
    redis_server, url = stores
    n = 10_000
    write(redis_server.url, tmp_path, n)
    env = {"GATEWAY_REDIS_URL": redis_server.url}
    before = views(env)
    rng = random.Random(16)
    kills = 0
    cmd = [sys.executable, "-m", "gateway.cli", "ledger", "archive", "--to", url, "--all", "--batch", "400"]
    deadline = time.monotonic() + 240
    while (left := stream_length(redis_server.url)) > 0:
        assert time.monotonic() < deadline
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**env, "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if kills < 4:  # kill it once it is under way: some batch trimmed, then a moment more
            while stream_length(redis_server.url) == left and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    assert kills == 4  # the archiver really died mid-run, several times
    assert views({**env, "GATEWAY_LEDGER_ARCHIVE_URL": url}) == before
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT request_id) FROM ledger_records").fetchone() == (n, n)


def test_the_gateway_archives_in_the_background(stores: tuple[RedisServer, str], tmp_path: Path) -> None:
    redis_server, url = stores
    write(redis_server.url, tmp_path, 400)  # all of days long past
    env = {"GATEWAY_REDIS_URL": redis_server.url}
    before = views(env)[0]
    policy = tmp_path / "policy.yaml"
    policy.write_text(two_tier_policy(["http://127.0.0.1:9"], ["http://127.0.0.1:9"]))
    gw = Gateway(
        policy,
        tmp_path,
        {
            **env,
            "GATEWAY_LEDGER_ARCHIVE_URL": url,
            "GATEWAY_LEDGER_ARCHIVE_INTERVAL_S": "0.3",
            "GATEWAY_ADMIN_TOKEN": "t",
        },
    )
    try:

        def archived() -> bool:  # logged once the run is over, just after its last trim
            lines = [json.loads(line) for line in gw.log_lines() if line.startswith("{")]
            return any(line.get("event") == "ledger_archived" for line in lines)

        deadline = time.monotonic() + 60
        while stream_length(redis_server.url) > 0 or not archived():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        api = httpx.get(f"{gw.url}/admin/ledger", params={"group_by": "tenant"}, headers={"authorization": "Bearer t"})
        assert sum(r["requests"] for r in api.json()["data"]) == 400
    finally:
        gw.stop()
    assert views({**env, "GATEWAY_LEDGER_ARCHIVE_URL": url})[0] == before
