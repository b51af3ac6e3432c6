"""Small builders shared by tests."""

from __future__ import annotations

from gateway.facts import RequestFacts


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
