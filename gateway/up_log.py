"""What ``gateway up`` shows of the gateway's log: the log itself goes to a file under ``.run/``;
the terminal gets the problems (warnings, errors, anything that is not a JSON line, such as a
traceback) as they happen and a one-line summary of the traffic when it changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgspec

_PROBLEMS = frozenset({"warning", "error", "critical", "exception"})


@dataclass
class Summary:
    requests: int = 0
    ok: int = 0  # 2xx
    refused: int = 0  # 4xx
    failed: int = 0  # 5xx, or no status
    input_tokens: int = 0
    output_tokens: int = 0
    tiers: dict[str, int] = field(default_factory=dict)

    def add(self, event: dict[str, Any]) -> None:
        self.requests += 1
        status = event.get("status")
        if isinstance(status, int) and 200 <= status < 300:
            self.ok += 1
        elif isinstance(status, int) and 400 <= status < 500:
            self.refused += 1
        else:
            self.failed += 1
        self.input_tokens += _int(event.get("prompt_tokens") or event.get("prompt_tokens_estimate"))
        self.output_tokens += _int(event.get("completion_tokens"))
        tier = event.get("tier")
        if isinstance(tier, str):
            self.tiers[tier] = self.tiers.get(tier, 0) + 1

    def line(self) -> str:
        tiers = ", ".join(f"{name} {n}" for name, n in sorted(self.tiers.items()))
        return (
            f"requests {self.requests} (ok {self.ok}, 4xx {self.refused}, failed {self.failed})"
            f" · tokens in {self.input_tokens:,} out {self.output_tokens:,}" + (f" · by tier: {tiers}" if tiers else "")
        )


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


class LogFollower:
    """Reads the lines the gateway appended to its log file since the last call."""

    def __init__(self, path: Path, out: TextIO) -> None:
        self.path = path
        self.out = out
        self.summary = Summary()
        self._offset = path.stat().st_size if path.exists() else 0
        self._partial = b""
        self._shown = ""

    def poll(self) -> None:
        """Echo new problems; print the summary line if it changed."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._take(raw)
        line = self.summary.line()
        if self.summary.requests and line != self._shown:
            print(line, file=self.out, flush=True)
            self._shown = line

    def _take(self, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            event = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            event = None
        if not isinstance(event, dict):
            print(f"  gateway: {raw.decode(errors='replace')}", file=self.out, flush=True)
            return
        if event.get("event") == "request":
            self.summary.add(event)
        if str(event.get("level", "")).lower() in _PROBLEMS:
            detail = event.get("error") or event.get("exception") or ""
            print(f"  gateway {event.get('level')}: {event.get('event')} {detail}".rstrip(), file=self.out, flush=True)
