"""The pipelined RESP connection against a real redis-server, including a restart under it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

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


# A time-out must mean "Redis did not answer", not "the event loop was too busy to read the answer".
# Production runs on uvloop, which runs timers before it polls sockets (asyncio's loop polls first),
# so both loops are tried.
LOOPS = ["asyncio", "uvloop"]


def run_on(loop: str, coro: Coroutine[Any, Any, None]) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        runner.run(coro)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_blocked_loop_does_not_fail_calls_redis_answered(loop: str, debug_redis: RedisServer) -> None:
    async def scenario() -> None:
        conn = RespConnection(debug_redis.url, timeout_s=0.2)
        try:
            assert await conn.call("PING") == b"PONG"

            def stall() -> None:
                time.sleep(0.6)
                asyncio.get_running_loop().time()  # as a busy loop's other callbacks do: it then polls without waiting

            async def call_then_stall(n: int) -> Any:
                if n == 0:
                    # Once the calls are queued the loop is stuck for a whole turn (as under CPU
                    # overload); Redis takes 20 ms, so the replies arrive after the loop's next poll
                    # and before its timers — uvloop's order — and wait in the socket for a turn.
                    asyncio.get_running_loop().call_later(0, stall)
                    return await conn.call("DEBUG", "SLEEP", "0.02")
                return await conn.call("INCR", "n")

            for _ in range(3):
                replies = await asyncio.gather(*(call_then_stall(i) for i in range(50)))
                assert len(set(replies[1:])) == 49
        finally:
            await conn.close()

    run_on(loop, scenario())


async def test_a_reply_waiting_unread_in_the_socket_is_not_a_timeout(redis_url: str) -> None:
    conn = RespConnection(redis_url, timeout_s=0.1)
    try:
        assert await conn.call("PING") == b"PONG"
        proto = conn._proto
        assert proto is not None and proto.transport is not None
        proto.transport.pause_reading()  # the loop does not get to read: the reply stays in the socket
        call = asyncio.ensure_future(conn.call("PING"))
        await asyncio.sleep(0.4)  # sweeps run on time, the deadline passes, the reply sits there
        assert not call.done()
        proto.transport.resume_reading()
        assert await call == b"PONG"
    finally:
        await conn.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stalled_redis_still_fails_calls_within_the_timeout(loop: str, debug_redis: RedisServer) -> None:
    async def scenario() -> None:
        conn = RespConnection(debug_redis.url, timeout_s=0.2)
        staller = RespConnection(debug_redis.url, timeout_s=5)
        try:
            assert await conn.call("PING") == b"PONG"
            assert await staller.call("PING") == b"PONG"
            stall = asyncio.ensure_future(staller.call("DEBUG", "SLEEP", "1"))  # Redis answers nobody for 1 s
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(TimeoutError):
                await conn.call("PING")
            assert 0.2 <= loop.time() - start < 0.7  # the time-out and a sweep (on a busy machine), not the 1 s stall
            assert await stall == b"OK"
            assert await conn.call("PING") == b"PONG"
        finally:
            await conn.close()
            await staller.close()

    run_on(loop, scenario())


@pytest.fixture(scope="module")
def debug_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-debug"), debug=True)
    yield server
    server.stop()
