"""An admission whose keys live in more than one Redis Cluster hash slot.

A request's limit keys carry its tenant's hash tag (``{t:<tenant>}``: key, tenant and tenant+tier
scopes, and budgets) — except a tier-wide limit (``scope: tier``), whose keys carry the tier's
(``{tier:<tier>}``), shared by every tenant of the tier. On one Redis a single script checks them
all at once; a cluster refuses a script whose keys span slots (CROSSSLOT). There, the admitter makes
one ``admit.lua`` call per hash tag, sent together (one round trip), and this module says which
items go in which call and how their replies combine:

- every part admitted: the request is admitted;
- any part refused: the request is refused with the first refusing item (in the policy's order),
  and every part that admitted is released at once, as a request that never reached a worker
  (``settle(..., reached=False)``: slots removed, the request, tokens and spend given back);
- a part's reply lost (time-out, connection lost) and no part refused: handled as any lost
  admission reply (fail_open/fail_closed), the parts that admitted are released, the lost part's
  late reply releases itself.

So no limit is ever exceeded: each part's script is atomic on its own keys, and a part counts a
request only while it is admitted or within one round trip of a refusal elsewhere. What a cluster
loses against one script is the other direction: a request refused by its tenant's limit holds a
unit of the tier-wide limit for that round trip, so a concurrent request of another tenant may be
refused by the tier limit although, with one script, it would have fitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class _Keyed(Protocol):
    @property
    def key(self) -> str: ...


def tag(key: str) -> str:
    """The hash tag part of a gateway key (``gw:{t:alice}`` of ``gw:{t:alice}:rl:0:tenant:r``)."""
    return key[: key.index("}") + 1]


def parts(items: Sequence[_Keyed]) -> list[list[int]]:
    """Item positions grouped by hash tag, groups in order of their first item."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tag(item.key), []).append(i)
    return list(groups.values())


def merge(replies: Sequence[list[int] | BaseException], groups: list[list[int]], n: int) -> list[int]:
    """One ``admit.lua`` reply for ``n`` items from the replies of their parts: allowed only if every
    part allowed; the failing item is the first refusing one, numbered among all ``n``; Redis's time is
    the earliest part's; per item, (remaining, reset) where its part answered, else (0, 0). Call it
    only when no part was lost, or when a part refused."""
    allowed, failing, retry_after = 1, 0, 0
    nows = [r[3] for r in replies if not isinstance(r, BaseException)]
    per_item: list[Any] = [0] * (2 * n)
    for reply, group in zip(replies, groups, strict=True):
        if isinstance(reply, BaseException):
            continue
        if not reply[0]:
            first = group[reply[1] - 1] + 1
            if allowed or first < failing:
                failing, retry_after = first, reply[2]
            allowed = 0
        for j, i in enumerate(group):
            if len(reply) > 5 + 2 * j:
                per_item[2 * i], per_item[2 * i + 1] = reply[4 + 2 * j], reply[5 + 2 * j]
    return [allowed, failing, retry_after, min(nows), *per_item]
