"""``GET /metrics`` on a port of its own (``GATEWAY_METRICS_HOST``:``GATEWAY_METRICS_PORT``, loopback
by default), optionally behind ``Authorization: Bearer $GATEWAY_METRICS_TOKEN``.

The serving port does not answer ``/metrics`` at all: the series carry tenants' tokens and spend,
and anyone holding an API key — or nobody, under ``auth: none`` — reaches the serving port.

A deliberately small HTTP/1.1 server on asyncio, started in the application's lifespan: one
request per connection, a bounded head (``MAX_HEAD_BYTES``, ``HEAD_TIMEOUT_S``), the exposition
rendered on a thread so a scrape never stalls the event loop. With ``gateway serve --workers N``
every process listens on the same port with ``SO_REUSEPORT`` and the kernel hands each scrape to
one of them; in prometheus-client's multiprocess mode any process renders every process's
samples, so whichever answers, the answer is the same — and it still comes while a process
restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac

import structlog

from gateway.errors import render
from gateway.metrics import exposition

JSON = "application/json"
MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT_S = 5.0

log = structlog.get_logger("gateway.metrics_listener")


class MetricsListener:
    def __init__(
        self, host: str, port: int, *, token: str | None, multiprocess_dir: str | None, reuse_port: bool
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.multiprocess_dir = multiprocess_dir
        self.reuse_port = reuse_port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; raises ``OSError`` if the address cannot be had (a start-up failure, said loudly)."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_HEAD_BYTES, reuse_port=self.reuse_port or None
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, content_type, extra = await self._answer(head)
            lines = [
                f"HTTP/1.1 {status}",
                f"content-type: {content_type}",
                f"content-length: {len(body)}",
                "connection: close",
                *extra,
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that is slow, says too much or goes away gets nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[str, bytes, str, list[str]]:
        """(status line, body, content type, extra header lines) for one request head."""
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        target = rest.partition(" ")[0].partition("?")[0]
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if target != "/metrics":
            return "404 Not Found", _error("Metrics are at /metrics.", "invalid_request_error", "not_found"), JSON, []
        if method != "GET":
            return "405 Method Not Allowed", _error("Use GET.", "invalid_request_error", "method_not_allowed"), JSON, []
        if self.token is not None:
            given = headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                body = _error("The metrics token is missing or wrong.", "authentication_error", "invalid_token")
                return "401 Unauthorized", body, JSON, ['www-authenticate: Bearer realm="metrics"']
        body, content_type = await asyncio.to_thread(exposition, self.multiprocess_dir)
        return "200 OK", body, content_type, []


def _error(message: str, type_: str, code: str) -> bytes:
    return render(message, type_, None, code)
