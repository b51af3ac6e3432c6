"""Bounds on a YAML document, checked on its event stream before anything is composed.

A policy arrives from operators, but also over ``PUT /admin/policy`` and ``gateway policy apply``,
and every replica composes it. Three shapes would otherwise stall or crash them all:

- a huge document: refused above ``MAX_BYTES`` before it is read at all;
- an alias bomb (a 351-byte "billion laughs" expands to 10⁹ values): each anchor's expanded size
  is counted as events stream by — plain integers, nothing is expanded — and the document is
  refused as soon as the total passes ``MAX_VALUES``;
- deep nesting (the composer and the converter recurse; 5,000 levels was a ``RecursionError``):
  refused past ``MAX_DEPTH`` levels, long before either would recurse that far;

plus an alias that points into the node that holds it (a cycle, which would never finish). Each
refusal names the line where it happened. Events come from libyaml when PyYAML has it (10x faster
than the pure-Python parser), which stops reading at the first refused event.
"""

from __future__ import annotations

from collections.abc import Iterable

import yaml

MAX_BYTES = 256 * 1024  # a policy is a few KB; this is ~5,000 static worker URLs
MAX_DEPTH = 64  # a policy nests ~6 levels
MAX_VALUES = 100_000  # scalars and collections after expanding aliases

FastLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class TooBig(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


def check_size(text: str, what: str) -> None:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_BYTES:
        raise TooBig(1, f"the {what} is {size} bytes; at most {MAX_BYTES} are accepted")


def check_events(events: Iterable[yaml.Event]) -> None:
    """Raise ``TooBig`` at the first event past a bound; parse errors pass through."""
    depth = 0
    total = 0  # values so far, aliases expanded
    anchors: dict[str, int] = {}  # anchor -> expanded size of its node
    open_: list[tuple[str | None, int]] = []  # collections being read: (anchor, total at start)
    for event in events:
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise TooBig(line, f"nested deeper than {MAX_DEPTH} levels")
            open_.append((event.anchor, total))
            total += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, start = open_.pop()
            if anchor is not None:
                anchors[anchor] = total - start
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                anchors[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_):
                raise TooBig(line, f"alias *{event.anchor} refers to a node that contains it")
            total += anchors.get(event.anchor or "", 1)  # an undefined alias is the composer's error
        if total > MAX_VALUES:
            raise TooBig(line, f"more than {MAX_VALUES} values once aliases are expanded (an alias bomb?)")
