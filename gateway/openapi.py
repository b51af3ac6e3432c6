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
        "flight (overloaded) or the shutdown grace period over (shutting_down)",
        504: "No first byte within the tier's first_byte timeout (worker_timeout)",
    }
    return {str(s): _json(_ref("Error"), why[s]) for s in statuses}


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
            "prompt": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                    {"type": "array", "items": {"type": "integer"}},
                    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                ]
            },
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
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                    },
                },
            },
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
}


def _generate(schema: str, summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"apiKey": []}, {}],
        "parameters": [
            {"name": "x-gateway-task", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(schema), "example": _EXAMPLES[schema]}}},
        "responses": {
            "200": {
                "description": "The worker's answer; with stream: true, server-sent events ending in data: [DONE]",
                "content": {JSON: {"schema": _ref("Completion")}, "text/event-stream": {"schema": _ref("Event")}},
            },
            **_errors(400, 401, 404, 413, 422, 429, 502, 503, 504),
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
        "/v1/models": {
            "get": {
                "summary": "The model names clients may send",
                "security": [{"apiKey": []}, {}],
                "responses": {"200": _json(_ref("ModelList"), "auto and every alias"), **_errors(401)},
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process is alive",
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
            "adminToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_ADMIN_TOKEN"},
        },
    },
}

_BODY = msgspec.json.encode(DOCUMENT)


@get("/openapi.json")
async def openapi_json() -> ASGIResponse:
    return ASGIResponse(body=_BODY, media_type=JSON)


ROUTES = [openapi_json]
