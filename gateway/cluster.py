"""Redis Cluster for the pipelined hot path: one ``RespConnection`` per primary, chosen by hash slot.

A cluster splits the key space into 16384 hash slots (CRC16 of the key's ``{hash tag}``, or of the
whole key) served by primaries. ``ClusterConnection`` keeps the slot → primary map (``CLUSTER
SLOTS``) and sends each command on the connection of the primary that serves its first key, so
everything ``RespConnection`` promises holds per primary: commands are pipelined, every call is
bounded by the time-out, a late reply still reaches its ``late`` callback, and a lost connection
hands ``LOST`` to the callbacks of the calls it carried. Commands to one key always travel on one
connection, in order — a slot release follows the renewal that named it, as on one Redis.

The map changes when a primary fails over (a replica takes its slots) or slots move:

- ``MOVED slot host:port``: the slot has a new owner. The map learns it from the reply at once,
  and a full refresh runs in the background. A single call (``call``, ``call_raw`` — admission) is
  sent again to the new owner: MOVED means the command did not run. Pipelined batches and
  ``send_nowait`` hand the error back to their owners, which already retry (settlements resend,
  the ledger spools and replays, slot releases wait in the admitter's unsent list, a failed renewal
  is rebuilt by the next round) — by then to the right primary.
- ``ASK slot host:port`` (a slot being migrated): a single call is sent once to the target, preceded
  by ``ASKING`` on the same connection in the same write; the map is left as it is.
- A connection that cannot be made, or is lost: a refresh, at most one every ``timeout_s``, asks
  every node it knows (and the URL's) for ``CLUSTER SLOTS`` and takes the first answer.

``SCRIPT LOAD`` goes to every node known (a script must be loaded where it runs; after a failover
the new primary answers NOSCRIPT and its caller loads again — on the owner MOVED named too, even
before a refresh has brought the map up to date). A command without a key goes to any
primary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import hiredis
import structlog
from redis.crc import key_slot

from gateway.resp import ConnectionLost, Late, RedisError, RespConnection, encode

log = structlog.get_logger("gateway.cluster")
SLOTS = 16384
Address = tuple[str, int]
Arg = bytes | str | int | float


def first_key(args: Sequence[Any]) -> bytes | None:
    """The key a command is routed by: EVAL/EVALSHA's first key, else the first argument."""
    if len(args) < 2:
        return None
    name = args[0].upper() if isinstance(args[0], bytes) else str(args[0]).upper().encode()
    if name in (b"EVALSHA", b"EVAL"):
        return _bytes(args[3]) if len(args) > 3 and int(args[2]) > 0 else None
    if name in (b"SCRIPT", b"PING", b"CLUSTER", b"INFO", b"WAIT", b"ASKING"):
        return None
    return _bytes(args[1])


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _decode(payload: bytes) -> list[Any]:
    """A command's arguments from its RESP encoding (hiredis reads requests as it reads replies)."""
    reader = hiredis.Reader()
    reader.feed(payload)
    args = reader.gets()
    return args if isinstance(args, list) else []


def redirect(error: BaseException) -> tuple[str, int, Address] | None:
    """("MOVED" or "ASK", slot, owner) from a redirection error; None for any other."""
    if not isinstance(error, RedisError):
        return None
    parts = str(error).split(" ")
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return parts[0], int(parts[1]), (host, int(port))


class ClusterConnection:
    """``resp.Connection`` over a Redis Cluster; ``url`` names any node (its password, if any, is
    every node's)."""

    cluster = True

    def __init__(self, url: str, timeout_s: float = 0.25):
        parts = urlsplit(url)
        self.seed: Address = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._auth = parts.netloc.rpartition("@")[0]
        self.timeout_s = timeout_s
        self.nodes: dict[Address, RespConnection] = {}
        self.slots: list[Address | None] = [None] * SLOTS
        self.primaries: list[Address] = []
        self._hooks: list[Callable[[], None]] = []
        self._refresh: asyncio.Task[None] | None = None
        self._last_refresh = -1e9
        self._connecting: dict[Address, asyncio.Task[None]] = {}
        self._closed = False
        self.refreshes = 0  # topology refreshes that changed nothing or something: for tests and logs

    # --- the map ---------------------------------------------------------------------------------

    def _node(self, addr: Address) -> RespConnection:
        node = self.nodes.get(addr)
        if node is None:
            auth = f"{self._auth}@" if self._auth else ""
            node = RespConnection(f"redis://{auth}{addr[0]}:{addr[1]}/0", self.timeout_s)
            node.on_connect(self._connected)
            self.nodes[addr] = node
        return node

    def _connected(self) -> None:
        for hook in self._hooks:
            hook()

    async def refresh(self) -> None:
        """Read the slot map from the first node that answers ``CLUSTER SLOTS``; single-flight."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._read_map())
        await asyncio.shield(self._refresh)

    def _refresh_soon(self) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:
            return
        if (self._refresh is None or self._refresh.done()) and loop.time() - self._last_refresh >= self.timeout_s:
            self._refresh = asyncio.ensure_future(self._read_map())
            self._refresh.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _read_map(self) -> None:
        self._last_refresh = asyncio.get_running_loop().time()
        candidates = list(dict.fromkeys([*self.primaries, self.seed, *self.nodes]))
        asks = [asyncio.ensure_future(self._node(a).call("CLUSTER", "SLOTS")) for a in candidates]
        error: BaseException | None = None
        try:
            for ask in asyncio.as_completed(asks):
                try:
                    answer = await ask
                except (RedisError, OSError, TimeoutError) as exc:
                    error = exc
                    continue
                if answer:
                    self._apply(answer)
                    return
        finally:
            for ask in asks:
                ask.cancel()
            await asyncio.gather(*asks, return_exceptions=True)
        raise RedisError(f"no Redis Cluster node answered CLUSTER SLOTS: {error!r}")

    def _apply(self, answer: list[Any]) -> None:
        slots: list[Address | None] = [None] * SLOTS
        primaries: list[Address] = []
        for row in answer:
            start, end, primary = int(row[0]), int(row[1]), row[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            addr = (host or self.seed[0], int(primary[1]))
            slots[start : end + 1] = [addr] * (end - start + 1)
            if addr not in primaries:
                primaries.append(addr)
        if primaries != self.primaries:
            log.info("redis_cluster_map", primaries=[f"{h}:{p}" for h, p in primaries])
        self.slots, self.primaries = slots, primaries
        self.refreshes += 1

    def _learn(self, error: BaseException) -> None:
        """What a failed command says about the map: MOVED names the slot's owner; a connection that
        could not be made or was lost may mean a failover — ask the cluster."""
        moved = redirect(error)
        if moved is not None:
            if moved[0] == "MOVED":
                self.slots[moved[1]] = moved[2]
                self._refresh_soon()
        elif isinstance(error, ConnectionLost) or (
            isinstance(error, RedisError) and str(error).startswith("cannot connect")
        ):
            self._refresh_soon()

    async def _owner(self, key: bytes | None) -> RespConnection:
        if not self.primaries:
            await self.refresh()
        if key is None:
            return self._node(self.primaries[0])
        addr = self.slots[key_slot(key)]
        if addr is None:
            await self.refresh()
            addr = self.slots[key_slot(key)]
            if addr is None:
                raise RedisError(f"no primary serves the slot of {key!r}")
        return self._node(addr)

    # --- resp.Connection -------------------------------------------------------------------------

    def on_connect(self, hook: Callable[[], None]) -> None:
        """``hook`` runs whenever a connection to any primary is made, before anything else is sent on it."""
        self._hooks.append(hook)

    @property
    def connected(self) -> bool:
        return any(node.connected for node in self.nodes.values())

    async def call(self, *args: Arg) -> Any:
        if len(args) >= 2 and str(args[0]).upper() == "SCRIPT" and str(args[1]).upper() == "LOAD":
            return await self._everywhere(args)
        return await self.call_raw(encode(args), None, first_key(args))

    async def _everywhere(self, args: tuple[Arg, ...]) -> Any:
        """On every node known: the primaries of the last map, the owners MOVED named since, and every
        node a connection was made to (a replica that has the script already has it when promoted)."""
        if not self.primaries:
            await self.refresh()
        nodes = list(dict.fromkeys([*self.primaries, *(a for a in set(self.slots) if a is not None), *self.nodes]))
        replies = await asyncio.gather(*(self._node(a).call(*args) for a in nodes), return_exceptions=True)
        for addr, reply in zip(nodes, replies, strict=True):
            if isinstance(reply, BaseException):
                self._learn(reply)
                log.warning("redis_cluster_command_failed", node=f"{addr[0]}:{addr[1]}", error=repr(reply))
        # the same answer from each (a script's SHA): one primary that is down (failing over) must not
        # fail the load on the others — its replacement answers NOSCRIPT and is loaded then
        answered = [r for r in replies if not isinstance(r, BaseException)]
        if not answered:
            raise replies[0]
        return answered[0]

    async def call_raw(self, payload: bytes, late: Late | None = None, key: bytes | None = None) -> Any:
        if key is None:
            key = first_key(_decode(payload))
        node = await self._owner(key)
        watched = self._watch(late)
        try:
            return await node.call_raw(payload, watched)
        except (RedisError, OSError) as exc:
            self._learn(exc)
            moved = redirect(exc)
            if moved is None:
                raise
        # redirected: the command did not run; once more, to the owner the error named
        target = self._node(moved[2])
        if moved[0] == "ASK":
            await target.call("PING")  # connected, so that ASKING and the command leave in one write
            asking = target.send_nowait(encode(("ASKING",)))
            if asking is not None:
                asking.add_done_callback(
                    lambda f: f.cancelled() or f.exception()
                )  # its error, if any, is the next one's
        return await target.call_raw(payload, watched)

    def _watch(self, late: Late | None) -> Late | None:
        """``late``, also learning from what a reply nobody waited for says about the map."""
        if late is None:
            return None

        def watched(reply: Any) -> None:
            if isinstance(reply, BaseException):
                self._learn(reply)
            late(reply)

        return watched

    def send_nowait(self, payload: bytes, late: Late | None = None) -> asyncio.Future[Any] | None:
        if not self.primaries:
            self._refresh_soon()
            return None
        key = first_key(_decode(payload))
        addr = self.slots[key_slot(key)] if key is not None else self.primaries[0]
        if addr is None:
            self._refresh_soon()
            return None
        node = self._node(addr)
        fut = node.send_nowait(payload, self._watch(late))
        if fut is None:
            self._connect_soon(addr)  # its on-connect hooks send what waits for it
            return None
        fut.add_done_callback(self._learn_from)
        return fut

    def _learn_from(self, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self._learn(exc)

    def _connect_soon(self, addr: Address) -> None:
        if addr in self._connecting or self._closed:
            return

        async def connect() -> None:
            try:
                await self._node(addr).call("PING")
            except (RedisError, OSError, TimeoutError) as exc:
                self._learn(exc)
            finally:
                self._connecting.pop(addr, None)

        self._connecting[addr] = asyncio.ensure_future(connect())

    async def pipeline(self, commands: Sequence[tuple[Arg, ...]]) -> list[Any]:
        """Each command on its primary's connection (one write per primary, all at once), a command
        without a key on the connection of the one before it; replies or errors in order. Redirected
        commands come back as errors, after the map has learnt from them."""
        if not self.primaries:
            await self.refresh()
        groups: dict[Address, list[int]] = {}
        addr: Address | None = self.primaries[0]
        for i, command in enumerate(commands):
            key = first_key(command)
            if key is not None:
                addr = self.slots[key_slot(key)] or self.primaries[0]
            # a command without a key (WAIT) goes with the command before it
            groups.setdefault(addr or self.primaries[0], []).append(i)
        out: list[Any] = [None] * len(commands)

        async def send(addr: Address, positions: list[int]) -> None:
            try:
                replies = await self._node(addr).pipeline([commands[i] for i in positions])
            except (RedisError, OSError, TimeoutError) as exc:
                replies = [exc] * len(positions)
            for i, reply in zip(positions, replies, strict=True):
                out[i] = reply
                if isinstance(reply, BaseException):
                    self._learn(reply)

        await asyncio.gather(*(send(a, p) for a, p in groups.items()))
        return out

    async def close(self) -> None:
        self._closed = True
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh
        for task in list(self._connecting.values()):
            task.cancel()
        await asyncio.gather(*self._connecting.values(), return_exceptions=True)
        for node in self.nodes.values():
            await node.close()
