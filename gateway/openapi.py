"""``GET /openapi.json``: an OpenAPI 3.1 description of the OpenAI endpoints and the admin API.

Written by hand rather than generated: the two hot endpoints are raw ASGI handlers (Litestar
cannot see their bodies), the admin handlers read their bodies themselves, and what a client
needs to know — the fields the gateway checks, every status it answers and OpenAI's error
shape — is the contract, not the handlers' signatures. Request schemas declare exactly what the
gateway enforces (``schemas.py``): any other field is passed to the worker untouched, so objects
stay open. ``tests/e2e/test_openapi.py`` runs schemathesis against a real gateway with it.

The document is built and encoded once, at import.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import get
from litestar.response.base import ASGIResponse

from gateway.jsondepth import MAX_DEPTH
from gateway.keys import LABEL_MAX, TENANT_MAX, TENANT_PATTERN

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    why = {
        400: "Invalid request (OpenAI's invalid_request_error; also a worker's own 400, relayed)",
        401: "Missing or unknown API key / admin token",
        403: "The admin API is off (no GATEWAY_ADMIN_TOKEN)",
        404: "Unknown model, key or path",
        413: "Body larger than GATEWAY_MAX_BODY_BYTES",
        422: "A worker's own validation error, relayed",
        429: "A rate limit or budget would be exceeded (Retry-After)",
        502: "Workers failed on every attempt (worker_unavailable)",
        503: "No healthy worker (no_healthy_worker), Redis unavailable (state_unavailable), too many requests in "
        "flight (overloaded), every worker of the tier at its max_inflight past the queue's bound or deadline "
        "(tier_saturated, Retry-After) or the shutdown grace period over (shutting_down)",
        504: "No first byte within the tier's first_byte timeout (worker_timeout)",
    }
    return {str(s): _json(_ref("Error"), why[s]) for s in statuses}


def _anthropic_errors(*statuses: int) -> dict[str, Any]:
    """The same statuses in Anthropic's error shape (the Messages endpoints answer in it)."""
    return {
        code: {**spec, "content": {JSON: {"schema": _ref("AnthropicError")}}}
        for code, spec in _errors(*statuses).items()
    }


_NON_NEG = {"type": ["integer", "null"], "minimum": 0}
_POSITIVE = {"type": ["integer", "null"], "minimum": 1}

_COMMON_FIELDS: dict[str, Any] = {
    "model": {
        # "auto" spelled out so that generated requests reach a worker, not only the 404 of unknown models
        "anyOf": [{"const": "auto"}, {"type": "string", "minLength": 1}],
        "description": "`auto`, or an alias from GET /v1/models (else 404 model_not_found)",
    },
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": ["boolean", "null"]}},
    },
    "max_tokens": _NON_NEG,
    "n": {**_POSITIVE, "description": "completions; at most the policy's max_n (default 128)"},
    "best_of": _POSITIVE,
    "metadata": {"type": ["object", "null"], "properties": {"task": {"type": ["string", "null"]}}},
}

_CONTENT: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "null"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"type": "string"}, "text": {"type": ["string", "null"]}},
            },
        },
    ]
}
_PROMPT: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ]
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": ["string", "null"]},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "integer", "null"]},
                },
            }
        },
    },
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "EmbeddingRequest": {
        "type": "object",
        "description": f"Other fields reach the worker unchanged. JSON nested over {MAX_DEPTH} levels is refused.",
        "required": ["model", "input"],
        "properties": {
            "model": _COMMON_FIELDS["model"],
            "input": {**_PROMPT, "description": "each item of a batch is counted and billed"},
            "metadata": _COMMON_FIELDS["metadata"],
        },
    },
    "EmbeddingList": {
        "type": "object",
        "description": "The worker's answer (vLLM's EmbeddingResponse), relayed",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "model": {"type": "string"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "embedding"],
                    "properties": {
                        "index": {"type": "integer"},
                        "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]},
                    },
                },
            },
            "usage": {"type": ["object", "null"]},
        },
    },
    "ResponsesRequest": {
        "type": "object",
        "description": f"Other fields reach the worker unchanged. JSON nested over {MAX_DEPTH} levels is refused.",
        "required": ["model", "input"],
        "properties": {
            **_COMMON_FIELDS,
            "input": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"role": {"type": ["string", "null"]}, "content": _CONTENT},
                        },
                    },
                ]
            },
            "instructions": {"type": ["string", "null"]},
            "max_output_tokens": {**_NON_NEG, "description": "routed and reserved as max_tokens"},
        },
    },
    "Response": {
        "type": "object",
        "description": "The worker's Responses object, relayed",
        "required": ["id", "object"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "status": {"type": ["string", "null"]},
            "output": {"type": "array"},
            "usage": {"type": ["object", "null"]},
        },
    },
    "MessagesRequest": {
        "type": "object",
        "description": f"Anthropic Messages; other fields reach the worker unchanged; JSON over {MAX_DEPTH} deep: 400",
        "required": ["model", "messages"],
        "properties": {
            **_COMMON_FIELDS,
            "messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {"role": {"type": "string"}, "content": _CONTENT},
                },
            },
            "system": _CONTENT,
        },
    },
    "Message": {
        "type": "object",
        "description": "The worker's Anthropic message, relayed",
        "required": ["id", "type", "content"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "message"},
            "role": {"type": "string"},
            "content": {"type": "array"},
            "usage": {"type": ["object", "null"]},
        },
    },
    "TokenCount": {
        "type": "object",
        "required": ["input_tokens"],
        "properties": {"input_tokens": {"type": "integer"}},
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "RerankRequest": {
        "type": "object",
        "description": "vLLM's rerank: one query, documents; model optional (auto). Other fields reach the worker.",
        "required": ["query", "documents"],
        "properties": {
            "model": _COMMON_FIELDS["model"],
            "query": {"type": "string"},
            "documents": {"type": "array", "items": {"type": "string"}},
            "top_n": {"type": "integer", "minimum": 0},
            "metadata": _COMMON_FIELDS["metadata"],
        },
    },
    "Rerank": {
        "type": "object",
        "required": ["id", "model", "usage", "results"],
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string"},
            "usage": {"type": "object", "required": ["total_tokens"]},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "relevance_score"],
                    "properties": {"index": {"type": "integer"}, "relevance_score": {"type": "number"}},
                },
            },
        },
    },
    "ScoreRequest": {
        "type": "object",
        "description": "vLLM's score: queries against documents (also data_1/data_2, text_1/text_2); model optional",
        "required": ["queries", "documents"],
        "properties": {
            "model": _COMMON_FIELDS["model"],
            "queries": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "documents": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "metadata": _COMMON_FIELDS["metadata"],
        },
    },
    "Score": {
        "type": "object",
        "required": ["object", "data", "usage"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "score"],
                    "properties": {"index": {"type": "integer"}, "score": {"type": "number"}},
                },
            },
            "usage": {"type": "object", "required": ["prompt_tokens"]},
        },
    },
    "TokenizeRequest": {
        "type": "object",
        "description": "vLLM's tokenize: a prompt or chat messages; model optional (auto)",
        "properties": {
            "model": _COMMON_FIELDS["model"],
            "prompt": {"type": "string"},
            "messages": {"type": "array", "items": _ref("ChatMessage")},
            "metadata": _COMMON_FIELDS["metadata"],
        },
    },
    "Tokens": {
        "type": "object",
        "required": ["count", "tokens"],
        "properties": {
            "count": {"type": "integer"},
            "max_model_len": {"type": "integer"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "DetokenizeRequest": {
        "type": "object",
        "required": ["tokens"],
        "properties": {
            "model": _COMMON_FIELDS["model"],
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "metadata": _COMMON_FIELDS["metadata"],
        },
    },
    "Detokenized": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string"},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "null"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type"],
                            "properties": {"type": {"type": "string"}, "text": {"type": ["string", "null"]}},
                        },
                    },
                ]
            },
            "name": {"type": ["string", "null"]},
        },
    },
    "ChatRequest": {
        "type": "object",
        "description": f"Other fields reach the worker unchanged. JSON nested over {MAX_DEPTH} levels is refused.",
        "required": ["model", "messages"],
        "properties": {
            **_COMMON_FIELDS,
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "max_completion_tokens": _NON_NEG,
        },
    },
    "CompletionRequest": {
        "type": "object",
        "description": f"Other fields reach the worker unchanged. JSON nested over {MAX_DEPTH} levels is refused.",
        "required": ["model", "prompt"],
        "properties": {
            **_COMMON_FIELDS,
            "prompt": _PROMPT,
        },
    },
    "Completion": {
        "type": "object",
        "description": "The worker's answer (vLLM's OpenAI-compatible shape), relayed",
        "required": ["choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "model": {"type": "string"},
            "choices": {"type": "array"},
            "usage": {"type": ["object", "null"]},
        },
    },
    "Event": {
        "description": "One server-sent event: data is a JSON chunk, an error object, or [DONE]",
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string"}},
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "Key": {
        "type": "object",
        "required": ["id", "tenant", "label", "created", "last_used", "revoked"],
        "properties": {
            "id": {"type": "string"},
            "tenant": {"type": "string"},
            "label": {"type": "string"},
            "created": {"type": "number"},
            "last_used": {"type": ["number", "null"]},
            "revoked": {"type": "boolean"},
        },
    },
    "NewKey": {
        "type": "object",
        "required": ["tenant"],
        "additionalProperties": False,
        "properties": {
            "tenant": {"type": "string", "pattern": TENANT_PATTERN, "maxLength": TENANT_MAX},
            "label": {"type": "string", "maxLength": LABEL_MAX},
        },
    },
    "CreatedKey": {
        "type": "object",
        "required": ["id", "tenant", "label", "key"],
        "properties": {
            "id": {"type": "string"},
            "tenant": {"type": "string"},
            "label": {"type": "string"},
            "key": {"type": "string", "description": "the secret: shown once"},
        },
    },
    "ExplainRequest": {
        "description": 'A request body, or {"body": …, "tenant": …, "headers": {…}}',
        "type": "object",
        "properties": {
            "body": {"type": ["object", "null"]},
            "tenant": {"type": ["string", "null"]},
            "headers": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        },
    },
    "Explanation": {
        "type": "object",
        "required": ["policy", "facts", "routes", "decision", "error"],
        "properties": {
            "policy": {"type": "string"},
            "facts": {"type": "object"},
            "routes": {"type": "array", "items": {"type": "object"}},
            "decision": {"type": ["object", "null"]},
            "error": {"type": ["string", "null"]},
            "output_tokens_estimate": {"type": ["integer", "null"]},
            "output_estimate_from": {"type": ["string", "null"]},
            "estimated_cost_usd": {"type": ["string", "null"]},
        },
    },
}

_DAY = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "YYYY-MM-DD (UTC)"}
_LEDGER_PARAMS = [
    {"name": "since", "in": "query", "required": False, "schema": _DAY},
    {"name": "until", "in": "query", "required": False, "schema": _DAY},
    {
        "name": "group_by",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "description": "comma-separated: day, tenant, tier, route, model"},
    },
]
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
_ADMIN_ERRORS = (401, 403)


_EXAMPLES = {
    "ChatRequest": {"model": "auto", "messages": [{"role": "user", "content": "Sports or politics?"}], "max_tokens": 8},
    "CompletionRequest": {"model": "auto", "prompt": "Once upon a time", "max_tokens": 8, "stream": True},
    "EmbeddingRequest": {"model": "auto", "input": ["first document", "second document"]},
    "ResponsesRequest": {"model": "auto", "input": "Sports or politics?", "max_output_tokens": 8},
    "MessagesRequest": {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]},
    "RerankRequest": {"model": "auto", "query": "capital of France", "documents": ["Paris", "Berlin"], "top_n": 1},
    "ScoreRequest": {"queries": "capital of France", "documents": ["Paris", "Berlin"]},
    "TokenizeRequest": {"prompt": "How many tokens?"},
    "DetokenizeRequest": {"tokens": [4438, 1690, 11460, 30]},
}
_TASK_HEADER = {"name": "x-gateway-task", "in": "header", "required": False, "schema": {"type": "string"}}
_STREAM = "; with stream: true, server-sent events"


def _generate(
    schema: str,
    summary: str,
    answer: str = "Completion",
    stream: str = " ending in data: [DONE]",
    errors: Any = _errors,
    security: list[dict[str, list[str]]] | None = None,
) -> dict[str, Any]:
    """A routed, governed POST: the request schema, the worker's answer (or its event stream), errors."""
    content: dict[str, Any] = {JSON: {"schema": _ref(answer)}}
    if stream:
        content["text/event-stream"] = {"schema": _ref("Event")}
    return {
        "summary": summary,
        "security": security or [{"apiKey": []}, {}],
        "parameters": [_TASK_HEADER],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(schema), "example": _EXAMPLES[schema]}}},
        "responses": {
            "200": {"description": f"The worker's answer{_STREAM + stream if stream else ''}", "content": content},
            **errors(400, 401, 404, 413, 422, 429, 502, 503, 504),
        },
    }


_ANTHROPIC_KEY: list[dict[str, list[str]]] = [{"apiKey": []}, {"anthropicKey": []}, {}]
_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _follow_up(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"apiKey": []}, {}],
        "parameters": [_RESPONSE_ID],
        "responses": {
            "200": _json(_ref("Response"), "the worker's stored response"),
            **_errors(400, 401, 404, 502, 503, 504),
        },
    }


DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "llm-gateway",
        "version": "1",
        "description": "OpenAI-compatible multi-tier routing gateway; errors use OpenAI's shape.",
    },
    "paths": {
        "/v1/chat/completions": {"post": _generate("ChatRequest", "Chat completion, plain or streaming")},
        "/v1/completions": {"post": _generate("CompletionRequest", "Legacy completion")},
        "/v1/embeddings": {
            "post": _generate("EmbeddingRequest", "Embeddings; billed for input tokens", "EmbeddingList", stream="")
        },
        "/v1/responses": {
            "post": _generate("ResponsesRequest", "OpenAI Responses, plain or streaming", "Response", " (event: lines)")
        },
        "/v1/responses/{response_id}": {"get": _follow_up("A stored response, from the worker that holds it")},
        "/v1/responses/{response_id}/cancel": {"post": _follow_up("Cancel a response on the worker that holds it")},
        "/v1/messages": {
            "post": _generate(
                "MessagesRequest",
                "Anthropic Messages, plain or streaming; errors in Anthropic's shape",
                "Message",
                " (event: lines)",
                _anthropic_errors,
                _ANTHROPIC_KEY,
            )
        },
        "/v1/messages/count_tokens": {
            "post": _generate(
                "MessagesRequest",
                "Anthropic's token count, from a worker of the tier the request routes to; not billed",
                "TokenCount",
                "",
                _anthropic_errors,
                _ANTHROPIC_KEY,
            )
        },
        **{
            path: {"post": _generate("RerankRequest", "vLLM's rerank; billed for input tokens", "Rerank", stream="")}
            for path in ("/rerank", "/v1/rerank")
        },
        **{
            path: {"post": _generate("ScoreRequest", "vLLM's pair scores; billed for input tokens", "Score", stream="")}
            for path in ("/score", "/v1/score")
        },
        "/tokenize": {
            "post": _generate(
                "TokenizeRequest",
                "Tokens, from a worker of the tier the request routes to; not billed",
                "Tokens",
                stream="",
            )
        },
        "/detokenize": {
            "post": _generate(
                "DetokenizeRequest",
                "Text of tokens, from a worker of the routed tier; not billed",
                "Detokenized",
                stream="",
            )
        },
        "/v1/models": {
            "get": {
                "summary": "The model names clients may send",
                "security": [{"apiKey": []}, {}],
                "responses": {"200": _json(_ref("ModelList"), "auto and every alias"), **_errors(401)},
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "summary": "One model name clients may send (openai's models.retrieve)",
                "security": [{"apiKey": []}, {}],
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(_ref("Model"), "auto or an alias"), **_errors(401, 404)},
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process is alive",
                "responses": {"200": _json({"type": "object", "required": ["status"]}, "alive")},
            }
        },
        "/health": {
            "get": {
                "summary": "The process is alive (vLLM's path, for clients such as guidellm)",
                "responses": {"200": _json({"type": "object", "required": ["status"]}, "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Policy loaded and every tier has a healthy worker",
                "responses": {
                    "200": _json({"type": "object", "required": ["status", "tiers"]}, "ready"),
                    "503": _json({"type": "object", "required": ["status", "tiers"]}, "not ready"),
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}
        },
        "/admin/keys": {
            "get": {
                "summary": "List API keys (never the secrets)",
                "security": _ADMIN,
                "parameters": [{"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["object", "data"],
                            "properties": {"data": {"type": "array", "items": _ref("Key")}},
                        },
                        "keys",
                    ),
                    **_errors(*_ADMIN_ERRORS),
                },
            },
            "post": {
                "summary": "Create a key; the secret is returned once",
                "security": _ADMIN,
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref("NewKey")}}},
                "responses": {"201": _json(_ref("CreatedKey"), "created"), **_errors(400, *_ADMIN_ERRORS)},
            },
        },
        "/admin/keys/{key_id}": {
            "delete": {
                "summary": "Revoke a key",
                "security": _ADMIN,
                "parameters": [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["id", "revoked"], "properties": {"revoked": {"const": True}}},
                        "revoked",
                    ),
                    **_errors(404, *_ADMIN_ERRORS),
                },
            }
        },
        "/admin/policy": {
            "get": {
                "summary": "The active policy",
                "security": _ADMIN,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["revision", "sha256", "source", "yaml"],
                            "properties": {
                                "revision": {"type": "string"},
                                "sha256": {"type": "string"},
                                "source": {"type": "string"},
                                "yaml": {"type": "string"},
                            },
                        },
                        "revision, sha256, source and YAML",
                    ),
                    **_errors(*_ADMIN_ERRORS),
                },
            },
            "put": {
                "summary": "Validate and apply a new policy (live on every replica within 1 s)",
                "security": _ADMIN,
                "parameters": [
                    {"name": "message", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "author", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}},
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["version", "changed"],
                            "properties": {"version": {"type": "integer"}, "changed": {"type": "boolean"}},
                        },
                        "applied (changed: false if it was already active)",
                    ),
                    "400": _json(
                        {
                            "allOf": [_ref("Error")],
                            "properties": {
                                "error": {"properties": {"problems": {"type": "array", "items": {"type": "string"}}}}
                            },
                        },
                        "invalid policy: every problem as FILE:LINE: message",
                    ),
                    **_errors(*_ADMIN_ERRORS),
                },
            },
        },
        "/admin/route/explain": {
            "post": {
                "summary": "Explain how the active policy routes a request",
                "security": _ADMIN,
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref("ExplainRequest")}}},
                "responses": {"200": _json(_ref("Explanation"), "every route checked"), **_errors(400, *_ADMIN_ERRORS)},
            }
        },
        "/admin/ledger": {
            "get": {
                "summary": "Cost report from the ledger's aggregates",
                "security": _ADMIN,
                "parameters": _LEDGER_PARAMS,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["group_by", "data"],
                            "properties": {"group_by": {"type": "array"}, "data": {"type": "array"}},
                        },
                        "rows; costs as exact decimal strings",
                    ),
                    **_errors(400, *_ADMIN_ERRORS),
                },
            }
        },
        "/admin/ledger.csv": {
            "get": {
                "summary": "Cost report as CSV",
                "security": _ADMIN,
                "parameters": _LEDGER_PARAMS,
                "responses": {
                    "200": {"description": "CSV", "content": {"text/csv": {"schema": {"type": "string"}}}},
                    **_errors(400, *_ADMIN_ERRORS),
                },
            }
        },
        "/admin/ledger/gpu": {
            "get": {
                "summary": "GPU-hour cost of the tiers priced by gpu_hour: per day and tier, used per tenant, idle",
                "security": _ADMIN,
                "parameters": _LEDGER_PARAMS[:2],
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["data"], "properties": {"data": {"type": "array"}}},
                        "one entry per day and tier; amounts as exact decimal strings (micro-dollars)",
                    ),
                    **_errors(400, *_ADMIN_ERRORS, 503),
                },
            }
        },
        "/ledger": {
            "get": {
                "summary": "The ledger page (its data comes from /admin/ledger)",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
    },
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key (gk_…)"},
            "anthropicKey": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "an API key (gk_…)"},
            "adminToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_ADMIN_TOKEN"},
        },
    },
}

_BODY = msgspec.json.encode(DOCUMENT)


@get("/openapi.json")
async def openapi_json() -> ASGIResponse:
    return ASGIResponse(body=_BODY, media_type=JSON)


ROUTES = [openapi_json]
