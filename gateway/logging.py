"""structlog set-up: JSON lines in production, console rendering on a terminal; and the request line.

Logs go to stderr; stdout belongs to the CLI's output. Lines a request causes name it with a
``request_id`` field passed where they are logged (not bound in contextvars: binding and merging
them on every request cost more than the line itself).

``RequestLog`` writes the one line per request (``Exchange.finish``). In JSON it skips structlog's
processor chain — the line is the same (the event's fields, then ``event``, ``level`` and an ISO
``timestamp``), encoded by msgspec with a timestamp whose seconds are formatted once per second —
and the lines finished in one turn of the event loop go out in one ``write``. On a terminal it
is an ordinary structlog line.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, BinaryIO

import msgspec
import structlog

from gateway.settings import LogFormat

_encode = msgspec.json.Encoder(decimal_format="number").encode
_LEVEL_NAMES = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}


def _json_bytes(event: dict[str, Any], **_: Any) -> bytes:
    return _encode(event)


def configure(fmt: LogFormat = "auto", level: str = "info") -> RequestLog:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        level_no = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(_json_bytes),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level_no),
            logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
            cache_logger_on_first_use=True,
        )
        return RequestLog(level_no, sys.stderr.buffer)
    structlog.configure(
        processors=[*shared, structlog.dev.ConsoleRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    return RequestLog(level_no, None)


class RequestLog:
    """The request line: JSON written directly to ``out``, or (``out`` None) through structlog."""

    def __init__(self, level: int = logging.INFO, out: BinaryIO | None = None):
        self.level = level
        self.out = out
        self._lines: list[bytes] = []
        self._second = -1
        self._prefix = ""
        self._log = structlog.get_logger("gateway.request")

    def _timestamp(self) -> str:
        """structlog's ``TimeStamper(fmt="iso", utc=True)``, with the date and time formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"

    def write(self, level: int, event: dict[str, Any]) -> None:
        if level < self.level:
            return
        if self.out is None:
            self._log.log(level, "request", **event)
            return
        event["event"] = "request"
        event["level"] = _LEVEL_NAMES.get(level, "info")
        event["timestamp"] = self._timestamp()
        lines = self._lines
        lines.append(_encode(event))
        if len(lines) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a test calling finish directly): now
                self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines and self.out is not None:
            lines.append(b"")
            self.out.write(b"\n".join(lines))
            self.out.flush()
