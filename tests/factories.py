"""Small builders shared by tests."""

from __future__ import annotations

from decimal import Decimal

from gateway.facts import RequestFacts
from gateway.ledger import LedgerRecord
from gateway.policy.schema import Price


def facts(**kw: object) -> RequestFacts:
    """RequestFacts of a plain request, with ``kw`` overriding any field."""
    base: dict[str, object] = {
        "tenant": "default",
        "task": None,
        "model": "auto",
        "prompt_tokens": 100,
        "max_tokens": None,
        "stream": False,
        "headers": {},
        "last_user_text": "",
    }
    return RequestFacts(**{**base, **kw})  # type: ignore[arg-type]


def ledger_record(
    request_id: str,
    *,
    time: float,
    tier: str = "small",
    prompt: int = 100,
    completion: int = 10,
    price_in: str = "0.10",
    price_out: str = "0.40",
    cached: int = 0,
    price_cached: str = "",
    **kw: object,
) -> LedgerRecord:
    """A successful request's ledger record, its cost computed from the prices (``cached`` of the
    prompt tokens at ``price_cached``, if given); ``kw`` overrides any other field."""
    base: dict[str, object] = {
        "tenant": "media",
        "key_id": "key_1",
        "route": "classify",
        "model": f"m-{tier}",
        "worker": "http://w:1",
        "policy": "v1",
        "prompt_tokens_estimate": prompt,
        "outcome": "ok",
        "attempts": 1,
        "ttfb_ms": 1.5,
        "latency_ms": 2.5,
        "task": "classification",
        "stream": False,
        "max_tokens": None,
    }
    price = Price(Decimal(price_in), Decimal(price_out), cached_input=Decimal(price_cached) if price_cached else None)
    return LedgerRecord(
        request_id=request_id,
        time=time,
        tier=tier,
        prompt_tokens=prompt,
        completion_tokens=completion,
        price_input=price_in,
        price_output=price_out,
        cost_usd=str(price.cost(prompt, completion, cached)),
        cached_tokens=cached,
        price_cached_input=price_cached,
        **{**base, **kw},  # type: ignore[arg-type]
    )
