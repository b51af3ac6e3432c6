"""Admin endpoints, behind ``Authorization: Bearer $GATEWAY_ADMIN_TOKEN``.

    GET    /admin/keys[?tenant=T]     list keys (never the secrets)
    POST   /admin/keys                {"tenant": T, "label": L} → {"id", "tenant", "label", "key"}
    DELETE /admin/keys/{key_id}       revoke

Without ``GATEWAY_ADMIN_TOKEN`` the admin API is off (403 for everyone).
"""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from litestar import Request, delete, get, post
from litestar.response.base import ASGIResponse

from gateway.errors import AdminForbidden, AuthenticationFailed, GatewayError, InvalidRequest, NotFound
from gateway.keys import KeyStore
from gateway.runtime import Runtime

JSON = "application/json"
_encode = msgspec.json.Encoder().encode


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    label: str = ""


def _guard(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.runtime
    token = rt.settings.admin_token
    if not token:
        raise AdminForbidden("The admin API is off: set GATEWAY_ADMIN_TOKEN to turn it on.")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AuthenticationFailed("A valid admin token is required.")
    return rt


def _error(exc: GatewayError) -> ASGIResponse:
    return ASGIResponse(body=exc.body(), status_code=exc.status, media_type=JSON, headers=exc.headers)


@get("/admin/keys")
async def list_keys(request: Request[Any, Any, Any]) -> ASGIResponse:
    try:
        rt = _guard(request)
        rows = await KeyStore(rt.redis).list(request.query_params.get("tenant"))
    except GatewayError as exc:
        return _error(exc)
    return ASGIResponse(body=_encode({"object": "list", "data": rows}), media_type=JSON)


@post("/admin/keys", status_code=201)
async def create_key(request: Request[Any, Any, Any]) -> ASGIResponse:
    try:
        rt = _guard(request)
        try:
            new = msgspec.json.decode(await request.body(), type=NewKey)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidRequest(f"Expected {{'tenant': str, 'label': str}}: {exc}") from None
        if not new.tenant.strip():
            raise InvalidRequest("tenant must not be empty", param="tenant")
        key_id, secret = await KeyStore(rt.redis).create(new.tenant, new.label)
    except GatewayError as exc:
        return _error(exc)
    body = {"id": key_id, "tenant": new.tenant, "label": new.label, "key": secret}
    return ASGIResponse(body=_encode(body), status_code=201, media_type=JSON)


@delete("/admin/keys/{key_id:str}", status_code=200)
async def revoke_key(request: Request[Any, Any, Any], key_id: str) -> ASGIResponse:
    try:
        rt = _guard(request)
        if not await KeyStore(rt.redis).revoke(key_id):
            raise NotFound(f"No key {key_id!r}.")
    except GatewayError as exc:
        return _error(exc)
    return ASGIResponse(body=_encode({"id": key_id, "revoked": True}), media_type=JSON)


ROUTES = [list_keys, create_key, revoke_key]
