"""``RequestFacts``: everything routing may look at, gathered once per request.

Produced after the parse and tokens stages; the routing decision, explain and simulate read only
this, never the raw request.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from gateway.schemas import ENDPOINTS, ParsedRequest

TASK_HEADER = "x-gateway-task"
TENANT_HEADER = "x-gateway-tenant"
DEFAULT_TENANT = "default"
NO_OUTPUT = frozenset(label for label, endpoint in ENDPOINTS.items() if not endpoint.generates)


class RequestFacts(msgspec.Struct, frozen=True):
    tenant: str
    task: str | None
    model: str
    prompt_tokens: int
    max_tokens: int | None
    stream: bool
    headers: Mapping[str, str]  # only the lower-case headers the policy looks at
    last_user_text: str = ""
    budget_used_pct: int = 0  # the tenant's budget spent, in % (the larger of day and month)
    # sequences generated: max(n, best_of). Each may run to max_tokens, so reservations and
    # estimates count completions * max_tokens output tokens.
    completions: int = 1
    endpoint: str = "chat"  # Endpoint.label: chat, completions, embeddings, responses, messages, count_tokens

    def output_estimate(self, default_max_tokens: int) -> int:
        """Output tokens a reservation or an estimate counts: ``max_tokens`` (else the tier's
        default) per completion; none for endpoints that generate nothing (embeddings)."""
        if self.endpoint in NO_OUTPUT:
            return 0
        per_completion = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return per_completion * self.completions


def select_headers(headers: Mapping[str, str], names: frozenset[str]) -> dict[str, str]:
    out = {}
    for name in names:
        value = headers.get(name)
        if value is not None:
            out[name] = value
    return out


def gather(
    parsed: ParsedRequest,
    prompt_tokens: int,
    tenant: str,
    headers: Mapping[str, str],
    header_names: frozenset[str],
    budget_used_pct: int = 0,
) -> RequestFacts:
    """Facts of a parsed request; ``headers`` must answer lower-case names."""
    return RequestFacts(
        tenant=tenant,
        task=headers.get(TASK_HEADER) or parsed.task,
        model=parsed.model,
        prompt_tokens=prompt_tokens,
        max_tokens=parsed.max_tokens,
        stream=parsed.stream,
        headers=select_headers(headers, header_names) if header_names else {},
        last_user_text=parsed.last_user_text,
        budget_used_pct=budget_used_pct,
        completions=parsed.completions,
        endpoint=parsed.endpoint.label,
    )
