"""structlog set-up: JSON lines in production, console rendering on a terminal.

Request-scoped values (``request_id``) are bound with contextvars at the start of a request, so
every line a request causes carries them. Logs go to stderr; stdout belongs to the CLI's output.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog

from gateway.settings import LogFormat

_encode = msgspec.json.Encoder(decimal_format="number").encode


def _json_bytes(event: dict[str, Any], **_: Any) -> bytes:
    return _encode(event)


def configure(fmt: LogFormat = "auto", level: str = "info") -> None:
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
    else:
        structlog.configure(
            processors=[*shared, structlog.dev.ConsoleRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(level_no),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=True,
        )
