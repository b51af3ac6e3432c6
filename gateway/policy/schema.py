"""Policy types: the strict shapes YAML decodes into, and the immutable ``Policy`` the gateway uses.

Loading is two steps (see ``load``): YAML is decoded into the ``Raw*`` structs, which forbid
unknown fields and check types; cross-references and value rules are then checked and the
result frozen into ``Policy``. Nothing else in the gateway sees a ``Raw*`` type.
"""

from __future__ import annotations

import datetime
import enum
import math
from decimal import Decimal, localcontext
from types import MappingProxyType
from typing import Annotated, Any, Literal

import msgspec
import re2

# --- step 1: what the YAML may say --------------------------------------------------------------


class RawWorker(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    max_inflight: int | None = None  # this worker's capacity, over the tier's


class RawPrice(msgspec.Struct, forbid_unknown_fields=True):
    input: Decimal
    output: Decimal
    embeddings: Decimal | None = None  # input price of embeddings, if not `input`
    cached_input: Decimal | None = None  # price of prompt tokens the worker served from its prefix cache
    effective_from: datetime.date | None = None  # UTC day this price starts; a list of prices changes it


class RawGpuHour(msgspec.Struct, forbid_unknown_fields=True):
    usd: Decimal  # per GPU per hour, busy or idle
    gpus_per_worker: int = 1


class RawTimeouts(msgspec.Struct, forbid_unknown_fields=True):
    connect: Decimal = Decimal(2)
    first_byte: Decimal = Decimal(120)
    idle: Decimal = Decimal(30)


class RawTier(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    price: RawPrice | list[RawPrice] | None = None  # may be left out when the tier has a gpu_hour price
    gpu_hour: RawGpuHour | None = None
    workers: list[RawWorker] = []
    max_context: int | None = None
    timeouts: RawTimeouts | None = None
    default_max_tokens: int = 256  # output tokens reserved when a request names no max_tokens
    # dns: each worker URL's name stands for every address it resolves to; redis: workers that
    # registered themselves under the tier (workers.registry), beside any static ones
    discover: Literal["dns", "redis"] | None = None
    affinity: dict[str, str] | None = None  # {header: NAME}: a session sticks to one worker
    placement: Literal["least_load", "prefix"] = "least_load"
    max_inflight: int | None = None  # requests per worker; above it requests queue at the gateway
    max_queue: int = 1024  # requests waiting for this tier's workers, at most (then 503)
    queue_timeout_ms: int = 10_000  # longest wait in that queue (then 503 with Retry-After)
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"  # as the workers' vLLM --scheduling-policy


class RawRange(msgspec.Struct, forbid_unknown_fields=True):
    gt: int | None = None
    gte: int | None = None
    lt: int | None = None
    lte: int | None = None


class RawMatch(msgspec.Struct, forbid_unknown_fields=True):
    task: list[str] | None = None
    model: list[str] | None = None
    tenant: list[str] | None = None
    prompt_tokens: RawRange | None = None
    max_tokens: RawRange | None = None
    stream: bool | None = None
    header: dict[str, str] | None = None
    content_regex: str | None = None
    budget_used_pct: RawRange | None = None
    endpoint: list[str] | None = None


class RawShadow(msgspec.Struct, forbid_unknown_fields=True):
    tier: str
    sample: Decimal
    compare: Literal["auto", "exact", "similarity"] = "auto"
    threshold: Decimal = Decimal("0.5")  # similarity at or above which two long answers agree
    max_in_flight: int = 4  # shadow calls of this route in flight per gateway process; more are dropped


class RawRoute(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    tier: str | None = None
    match: RawMatch | None = None
    fallback: list[str] = []
    split: dict[str, int] | None = None  # tier -> weight; instead of `tier`
    split_by: str | dict[str, str] | None = None  # "tenant" (default), "prompt" or {header: NAME}
    shadow: RawShadow | None = None  # also send a sample to another tier and compare the answers
    spill_after_ms: int | None = None  # go to the fallback when the tier's queue wait would pass this
    priority: Literal["interactive", "batch"] | None = None


class RawRetry(msgspec.Struct, forbid_unknown_fields=True):
    attempts_per_tier: int = 2
    max_attempts: int = 4
    deadline_s: Decimal = Decimal(30)
    on_timeout: Literal["auto", "always", "never"] = "auto"
    short_max_tokens: int = 16


class Scope(enum.Enum):
    KEY = "key"
    TENANT = "tenant"
    TIER = "tier"
    TENANT_TIER = "tenant+tier"


class BudgetAction(enum.StrEnum):
    REJECT = "reject"
    DOWNGRADE = "downgrade"


class RawBudget(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    action: BudgetAction
    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None
    downgrade_to: str | None = None


class RawFairness(msgspec.Struct, forbid_unknown_fields=True):
    weights: dict[str, int] = {}  # tenant -> weight in the tiers' queues
    default_weight: int = 1
    key_priority: dict[str, Literal["interactive", "batch"]] = {}  # API key id -> priority class


class RawLimit(msgspec.Struct, forbid_unknown_fields=True):
    scope: Scope
    tenant: str | None = None
    tier: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


class AuthMode(enum.Enum):
    API_KEY = "api_key"
    NONE = "none"


class RedisErrorMode(enum.Enum):
    FAIL_CLOSED = "fail_closed"
    FAIL_OPEN = "fail_open"


class RawPolicy(msgspec.Struct, forbid_unknown_fields=True):
    """The top level. Tiers, routes, limits and budgets stay plain data here: each is decoded on
    its own (``load``), so that every problem in every one of them is reported."""

    version: int
    tiers: dict[str, Any] = {}
    routes: list[Any] = []
    retry: RawRetry | None = None
    limits: list[Any] = []
    budgets: list[Any] = []
    auth: AuthMode = AuthMode.API_KEY
    on_redis_error: RedisErrorMode = RedisErrorMode.FAIL_CLOSED
    expected_replicas: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_n: Annotated[int, msgspec.Meta(ge=1)] = 128  # the most completions (n, best_of) one request may ask for
    fairness: Any = None  # decoded on its own (load._fairness): tenant weights, key priorities


# --- step 2: what the gateway uses --------------------------------------------------------------


MILLION = Decimal(1_000_000)  # prices are per one million tokens
BUDGET_UNIT = 10**9  # budgets count spend in integer nano-dollars (exact in Lua up to ~$9M)


class Price(msgspec.Struct, frozen=True):
    """USD per one million tokens, exact. ``cost`` is the one place a price becomes money: the
    ledger, reports, metrics, explain, simulate and budgets (``nano``) all call it."""

    input: Decimal
    output: Decimal
    embeddings: Decimal | None = None  # per 1M input tokens of embeddings; None: ``input``
    cached_input: Decimal | None = None  # per 1M cached prompt tokens (as the worker reports); None: ``input``

    def input_for(self, endpoint: str) -> Decimal:
        """The input price of a request to ``endpoint`` (an ``Endpoint.label``)."""
        if endpoint == "embeddings" and self.embeddings is not None:
            return self.embeddings
        return self.input

    def cost(self, prompt: int, completion: int, cached: int = 0, endpoint: str = "chat") -> Decimal:
        """USD, exact: 60 significant digits leave room for any price times any token count (the
        default context's 28 would round a large enough sum). ``cached`` of the ``prompt`` tokens are
        billed at ``cached_input`` when the price has one (else, like the rest, at the input price)."""
        with localcontext(prec=60):
            price_in = self.input_for(endpoint)
            if self.cached_input is None or not cached:
                billed_in = price_in * prompt
            else:
                billed_in = price_in * (prompt - cached) + self.cached_input * cached
            return (billed_in + self.output * completion) / MILLION

    def nano(self, prompt: int, completion: int, cached: int = 0, endpoint: str = "chat") -> int:
        """``cost`` in whole nano-dollars (``BUDGET_UNIT``), rounded up: a budget errs on its own side."""
        return nano_of(self.cost(prompt, completion, cached, endpoint))


def nano_of(cost: Decimal) -> int:
    """A cost in whole nano-dollars (``BUDGET_UNIT``), rounded up: a budget errs on its own side."""
    with localcontext(prec=60):
        return math.ceil(cost * BUDGET_UNIT)


def canonical(amount: Decimal) -> Decimal:
    """The same amount always written the same way: exact, without trailing zeros or an exponent.
    Sums of the same costs grouped differently (Redis's aggregates, the archive's rollup) are equal
    but can differ in trailing zeros ("23.77165145280" and "23.7716514528"); reports print this."""
    n = amount.normalize()
    return n.quantize(Decimal(1)) if n == n.to_integral_value() else n


class GpuHour(msgspec.Struct, frozen=True):
    """The tier's workers cost ``usd`` per GPU-hour, ``gpus_per_worker`` GPUs each, whether busy or
    idle (``gateway ledger report --cost gpu``)."""

    usd: Decimal
    gpus_per_worker: int


class Timeouts(msgspec.Struct, frozen=True):
    connect: float = 2.0
    first_byte: float = 120.0
    idle: float = 30.0


class Placement(enum.Enum):
    LEAST_LOAD = "least_load"
    PREFIX = "prefix"


class Priority(enum.IntEnum):
    """Queue classes, served strictly in order; the value is what vLLM's priority scheduler gets
    (lower runs first)."""

    INTERACTIVE = 0
    BATCH = 1

    @classmethod
    def named(cls, name: str | None) -> Priority | None:
        return None if name is None else cls[name.upper()]


class Tier(msgspec.Struct, frozen=True):
    name: str
    model: str
    workers: tuple[str, ...]
    price: Price  # in effect now; ``price_at`` for any time
    max_context: int | None
    timeouts: Timeouts
    default_max_tokens: int = 256
    discover_dns: bool = False
    discover_redis: bool = False
    affinity_header: str | None = None  # lower-case
    prices: tuple[tuple[float, Price], ...] = ()  # (effective from, unix seconds; price), oldest first
    gpu_hour: GpuHour | None = None
    placement: Placement = Placement.LEAST_LOAD
    max_inflight: int | None = None  # per worker; None: no gateway queue for this tier
    worker_max_inflight: tuple[tuple[str, int], ...] = ()  # (url, capacity) of workers that override it
    max_queue: int = 1024
    queue_timeout_s: float = 10.0
    engine_priority: bool = False  # the workers schedule by priority: send each request's class

    @property
    def gated(self) -> bool:
        """Does this tier have capacities, so that requests above them wait at the gateway?"""
        return self.max_inflight is not None or bool(self.worker_max_inflight)

    def capacity(self, url: str) -> int | None:
        for u, n in self.worker_max_inflight:
            if u == url:
                return n
        return self.max_inflight

    def price_at(self, when: float) -> Price:
        """The price in effect at ``when`` (unix seconds): history is billed at its own prices."""
        current = self.price
        for since, price in self.prices:
            if since <= when:
                current = price
        return current


class Range(msgspec.Struct, frozen=True):
    gt: int | None = None
    gte: int | None = None
    lt: int | None = None
    lte: int | None = None

    def contains(self, n: int) -> bool:
        return (
            (self.gt is None or n > self.gt)
            and (self.gte is None or n >= self.gte)
            and (self.lt is None or n < self.lt)
            and (self.lte is None or n <= self.lte)
        )

    def describe(self) -> str:
        parts = [f"{op} {v}" for op, v in (("gt", self.gt), ("gte", self.gte), ("lt", self.lt), ("lte", self.lte))]
        return " and ".join(p for p in parts if not p.endswith("None"))


class Match(msgspec.Struct, frozen=True):
    """Conditions of a route, all AND-ed; ``None`` means the condition is absent."""

    task: frozenset[str] | None = None
    model: frozenset[str] | None = None
    tenant: frozenset[str] | None = None
    prompt_tokens: Range | None = None
    max_tokens: Range | None = None
    stream: bool | None = None
    header: tuple[tuple[str, str], ...] | None = None  # (lower-case name, value)
    content_regex: re2._Regexp[str] | None = None  # RE2: linear-time matching (see load.compile_regex)
    budget_used_pct: Range | None = None
    endpoint: frozenset[str] | None = None  # Endpoint labels: chat, completions, embeddings, …


class Compare(enum.Enum):
    """How a shadow's answer is compared with the client's (``gateway/compare.py``)."""

    AUTO = "auto"  # exact for short answers, similarity for long ones
    EXACT = "exact"
    SIMILARITY = "similarity"


class Shadow(msgspec.Struct, frozen=True):
    """A route's shadow: a ``sample`` share of its requests is also sent to ``tier`` and compared."""

    tier: str
    sample: float
    compare: Compare = Compare.AUTO
    threshold: float = 0.5
    max_in_flight: int = 4


class Route(msgspec.Struct, frozen=True):
    name: str
    tier: str  # for a split route, its first side (the split decides per request)
    match: Match
    fallback: tuple[str, ...]
    line: int
    split: tuple[tuple[str, int], ...] = ()  # (tier, weight), in the order written
    split_header: str | None = None  # split by this lower-case header; by tenant when None
    shadow: Shadow | None = None
    split_prompt: bool = False  # split by a hash of the prompt (the last user message), not the tenant
    spill_after_ms: int | None = None
    priority: Priority | None = None


class TimeoutRetry(enum.Enum):
    """Whether a first-byte time-out may be retried on another worker."""

    AUTO = "auto"  # streams: yes; non-streaming: only if max_tokens <= short_max_tokens
    ALWAYS = "always"
    NEVER = "never"


class RetryPolicy(msgspec.Struct, frozen=True):
    attempts_per_tier: int = 2
    max_attempts: int = 4
    deadline_s: float = 30.0
    on_timeout: TimeoutRetry = TimeoutRetry.AUTO
    short_max_tokens: int = 16

    def retries_timeout(self, stream: bool, max_tokens: int | None) -> bool:
        """May a first-byte time-out be retried? A stream's first byte comes right after the
        prompt is read, so its time-out means a stuck or queued worker: retry. A non-streaming
        answer comes only when generation is done, so its time-out is most likely the generation
        itself, and a retry would generate (and cost) it twice — unless the answer is short (a
        label, a category: ``max_tokens`` at most ``short_max_tokens``)."""
        if self.on_timeout is TimeoutRetry.AUTO:
            return stream or (max_tokens is not None and max_tokens <= self.short_max_tokens)
        return self.on_timeout is TimeoutRetry.ALWAYS


class Limit(msgspec.Struct, frozen=True):
    """One line of ``limits:``. ``tenant``/``tier`` restrict it; without ``tier`` a tier-scoped
    limit counts each tier separately, as a tenant-scoped one counts each tenant separately."""

    index: int
    scope: Scope
    tenant: str | None
    tier: str | None
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    line: int


class Budget(msgspec.Struct, frozen=True):
    tenant: str
    daily: int | None  # nano-dollars
    monthly: int | None
    downgrade_to: str | None  # None: reject


class Fairness(msgspec.Struct, frozen=True):
    weights: MappingProxyType[str, int] = MappingProxyType({})
    default_weight: int = 1
    key_priority: MappingProxyType[str, Priority] = MappingProxyType({})

    def weight(self, tenant: str) -> int:
        return self.weights.get(tenant, self.default_weight)


class Policy(msgspec.Struct, frozen=True):
    """An immutable, validated routing policy. A request reads one snapshot and keeps it."""

    tiers: MappingProxyType[str, Tier]
    routes: tuple[Route, ...]
    retry: RetryPolicy
    source: str  # file name, for messages
    sha256: str
    revision: str  # shown in logs and headers; a stored version number once policies live in Redis
    aliases: frozenset[str]  # every model name a client may send besides "auto"
    header_names: frozenset[str]  # lower-case headers that routes look at
    limits: tuple[Limit, ...] = ()
    budgets: MappingProxyType[str, Budget] = MappingProxyType({})  # by tenant
    auth: AuthMode = AuthMode.API_KEY
    on_redis_error: RedisErrorMode = RedisErrorMode.FAIL_CLOSED
    expected_replicas: int = 1
    max_n: int = 128  # most completions (n, best_of) one request may ask for; more is a 400
    fairness: Fairness = Fairness()
