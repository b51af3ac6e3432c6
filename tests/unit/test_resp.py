"""The pipelined RESP connection against a real redis-server, including a restart under it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.resp import RedisError, RespConnection, Script
from tests.procs import RedisServer, free_port


async def test_calls_pipeline_and_errors(redis_url: str) -> None:
    conn = RespConnection(redis_url)
    assert await conn.call("SET", "a", "1") == b"OK"
    results = await asyncio.gather(*(conn.call("INCR", "a") for _ in range(100)))
    assert sorted(results) == list(range(2, 102))  # every caller got its own reply
    replies = await conn.pipeline([("GET", "a"), ("LPUSH", "a", "x"), ("DEL", "a")])
    assert replies[0] == b"101" and replies[2] == 1
    assert isinstance(replies[1], RedisError) and "WRONGTYPE" in str(replies[1])  # errors stay in their place
    with pytest.raises(RedisError, match="unknown command"):
        await conn.call("NOSUCHCOMMAND")
    assert await conn.call("PING") == b"PONG"  # the connection is still usable
    await conn.close()


async def test_evalsha_loads_scripts_on_noscript(redis_url: str) -> None:
    conn = RespConnection(redis_url)
    await conn.call("SCRIPT", "FLUSH")
    s = Script("return tonumber(ARGV[1]) + #KEYS")
    assert await conn.evalsha(s, ["k1", "k2"], [40]) == 42
    await conn.close()


async def test_unreachable_redis_fails_fast() -> None:
    conn = RespConnection(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.25)
    with pytest.raises(RedisError, match="cannot connect"):
        await conn.call("PING")


async def test_reconnects_after_a_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    conn = RespConnection(server.url)
    try:
        assert await conn.call("PING") == b"PONG"
        await asyncio.to_thread(server.stop)
        with pytest.raises((RedisError, TimeoutError)):
            await conn.call("PING")
        await asyncio.to_thread(server.start)
        assert await conn.call("PING") == b"PONG"
    finally:
        await conn.close()
        server.stop()


async def test_select_database(redis_server: RedisServer) -> None:
    conn = RespConnection(redis_server.url.replace("/0", "/3"))
    await conn.call("SET", "only-in-3", "x")
    other = RespConnection(redis_server.url)
    assert await other.call("GET", "only-in-3") is None
    assert await conn.call("GET", "only-in-3") == b"x"
    await conn.call("DEL", "only-in-3")
    await conn.close()
    await other.close()


async def test_a_stuck_redis_times_out_and_the_connection_recovers(tmp_path: Path) -> None:
    import os
    import signal

    server = RedisServer(tmp_path)
    conn = RespConnection(server.url, timeout_s=0.2)
    try:
        assert await conn.call("PING") == b"PONG"
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # Redis hangs: it accepts nothing and answers nothing
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await conn.call("PING")
        assert loop.time() - start < 1.0
        os.kill(server.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.1)
        assert await conn.call("PING") == b"PONG"  # late replies were matched and dropped, in order
    finally:
        await conn.close()
        server.stop()
