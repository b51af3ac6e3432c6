"""The admission stage: rate limits that hold exactly across gateway replicas.

Every applicable limit of ``policy.limits`` becomes one or more *items* — requests per minute,
tokens per minute, concurrent requests — each with its own Redis key. ``reserve`` checks and
reserves all of a request's items in ONE round trip (``lua/admit.lua``: atomic, on Redis's clock),
reserving tokens up front: the prompt estimate plus ``max_tokens`` (or the tier's
``default_max_tokens``). ``settle`` gives back what the request did not use — queued and sent in
batches off the client's path (``lua/settle.lua``). Concurrency slots and reservations expire by
themselves, so a gateway killed mid-request cannot hold capacity for ever.

The algorithm is GCRA (a token bucket kept as one timestamp): exact for weighted costs such as
tokens, O(1) per item, and with no window boundary that could let twice the limit through.

The modules: ``plan`` (items and keys), ``gcra`` (the in-process twin), ``call`` (the script call
encoded once per request shape; the Redis clock), ``refusals`` (429s and headers), ``admitter``
(reserve, settle, renew, release).

When Redis does not answer within its time-out, ``on_redis_error`` decides: ``fail_closed``
refuses with 503; ``fail_open`` admits against a per-process limiter of limit ÷
``expected_replicas`` and logs every such admission.
"""

from gateway.admission.admitter import LOCAL_SLOT_TTL_US, Admission, Admitter
from gateway.admission.call import AdmitCall, RedisClock
from gateway.admission.gcra import Gcra
from gateway.admission.plan import MINUTE_US, Item, Kind, applies, budget_items, plan
from gateway.admission.refusals import BudgetDowngrade, budget_refusal, duration, rate_limit_headers, rejection

__all__ = [
    "LOCAL_SLOT_TTL_US",
    "MINUTE_US",
    "Admission",
    "AdmitCall",
    "Admitter",
    "BudgetDowngrade",
    "Gcra",
    "Item",
    "Kind",
    "RedisClock",
    "applies",
    "budget_items",
    "budget_refusal",
    "duration",
    "plan",
    "rate_limit_headers",
    "rejection",
]
