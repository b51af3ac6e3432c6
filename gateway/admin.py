"""Admin endpoints, behind ``Authorization: Bearer $GATEWAY_ADMIN_TOKEN``.

    GET    /admin/keys[?tenant=T]     list keys (never the secrets)
    POST   /admin/keys                {"tenant": T, "label": L} → {"id", "tenant", "label", "key"}
    DELETE /admin/keys/{key_id}       revoke
    GET    /admin/policy              the active policy: revision, sha256, YAML
    PUT    /admin/policy              apply a new policy (body: YAML; ?message=&author=)
    POST   /admin/route/explain       explain a request under the active policy
    GET    /admin/ledger[.csv]        cost report (?since=&until=&group_by=)
    GET    /admin/ledger/gpu          GPU-hour cost: used per tenant and idle, per day and tier (?since=&until=)

Without ``GATEWAY_ADMIN_TOKEN`` the admin API is off (403 for everyone). Handlers raise the
error tree's exceptions; the app's one exception handler renders them.
"""

from __future__ import annotations

import asyncio
import hmac
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, delete, get, post, put
from litestar.response.base import ASGIResponse

from gateway import evidence, gpu_cost, jsondepth, ledger_report
from gateway.archive import ArchiveUnavailable
from gateway.errors import (
    AdminForbidden,
    AuthenticationFailed,
    InvalidPolicy,
    InvalidRequest,
    NotFound,
    StateUnavailable,
)
from gateway.keys import InvalidName, KeyStore, check_label, check_tenant
from gateway.policy.explain import explain
from gateway.policy.load import PolicyError
from gateway.policy.simulate import facts_of
from gateway.policy.store import PolicyStore
from gateway.runtime import Runtime

JSON = "application/json"
_encode = msgspec.json.Encoder().encode


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    label: str = ""


_new_key = msgspec.json.Decoder(NewKey)


def _guard(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.runtime
    token = rt.settings.admin_token
    if not token:
        raise AdminForbidden("The admin API is off: set GATEWAY_ADMIN_TOKEN to turn it on.")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AuthenticationFailed("A valid admin token is required.")
    return rt


@get("/admin/keys")
async def list_keys(request: Request[Any, Any, Any]) -> ASGIResponse:
    rt = _guard(request)
    rows = await KeyStore(rt.redis).list(request.query_params.get("tenant"))
    return ASGIResponse(body=_encode({"object": "list", "data": rows}), media_type=JSON)


@post("/admin/keys", status_code=201)
async def create_key(request: Request[Any, Any, Any]) -> ASGIResponse:
    rt = _guard(request)
    try:
        new = jsondepth.decode(await request.body(), _new_key)
    except ValueError as exc:  # msgspec's decode and validation errors, and invalid UTF-8
        raise InvalidRequest(f"Expected {{'tenant': str, 'label': str}}: {exc}") from None
    try:
        check_tenant(new.tenant)
        check_label(new.label)
    except InvalidName as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    key_id, secret = await KeyStore(rt.redis).create(new.tenant, new.label)
    body = {"id": key_id, "tenant": new.tenant, "label": new.label, "key": secret}
    return ASGIResponse(body=_encode(body), status_code=201, media_type=JSON)


@delete("/admin/keys/{key_id:str}", status_code=200)
async def revoke_key(request: Request[Any, Any, Any], key_id: str) -> ASGIResponse:
    rt = _guard(request)
    if not await KeyStore(rt.redis).revoke(key_id):
        raise NotFound(f"No key {key_id!r}.")
    return ASGIResponse(body=_encode({"id": key_id, "revoked": True}), media_type=JSON)


@get("/admin/policy")
async def get_policy(request: Request[Any, Any, Any]) -> ASGIResponse:
    rt = _guard(request)
    policy = rt.policy
    try:
        text = (await asyncio.to_thread(Path(policy.source).read_text)) if not policy.revision.startswith("v") else None
    except OSError:
        text = None
    if text is None:
        stored = await PolicyStore(rt.redis).get(int(policy.revision[1:])) if policy.revision.startswith("v") else None
        text = stored.yaml if stored else ""
    body = {"revision": policy.revision, "sha256": policy.sha256, "source": policy.source, "yaml": text}
    return ASGIResponse(body=_encode(body), media_type=JSON)


@put("/admin/policy", status_code=200)
async def put_policy(request: Request[Any, Any, Any]) -> ASGIResponse:
    """Body: the policy YAML. ``?message=…``; the author is ``?author=…`` or ``admin``."""
    rt = _guard(request)
    text = (await request.body()).decode("utf-8", errors="replace")
    author = request.query_params.get("author") or "admin"
    try:
        version, changed = await PolicyStore(rt.redis).apply(
            text, source="PUT /admin/policy", author=author, message=request.query_params.get("message", "")
        )
    except PolicyError as exc:
        raise InvalidPolicy(exc.problems) from None
    return ASGIResponse(body=_encode({"version": version.version, "changed": changed}), media_type=JSON)


@post("/admin/route/explain", status_code=200)
async def route_explain(request: Request[Any, Any, Any]) -> ASGIResponse:
    """Body: a request body, or ``{"body": …, "tenant": …, "headers": {…}}``; explained under the active policy."""
    rt = _guard(request)
    try:
        line = jsondepth.decode_any(await request.body())
        if not isinstance(line, dict):
            raise ValueError("expected a JSON object")
        facts, _ = facts_of(line)
    except ValueError as exc:  # msgspec's errors, invalid UTF-8, a line of the wrong shape
        raise InvalidRequest(f"Cannot read the request to explain: {exc}") from None
    return ASGIResponse(body=_encode(explain(rt.policy, facts)), media_type=JSON)


async def _ledger_rows(request: Request[Any, Any, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    rt = _guard(request)
    q = request.query_params
    group_by = [g for g in (q.get("group_by") or "day,tenant,tier").split(",") if g]
    try:
        archive = rt.settings.ledger_archive_url
        rows = await ledger_report.report(rt.redis, group_by, q.get("since"), q.get("until"), archive=archive)
    except ledger_report.BadQuery as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    except ArchiveUnavailable:
        raise StateUnavailable("The ledger archive cannot be read right now.") from None
    return rows, group_by


async def _task_report(request: Request[Any, Any, Any]) -> dict[str, Any] | None:
    """With ``task`` among the groups: the per-task profile (and agreement, with ``tier``), else None."""
    q = request.query_params
    group_by = [g for g in (q.get("group_by") or "").split(",") if g]
    if "task" not in group_by:
        return None
    rt = _guard(request)
    try:
        return await evidence.task_report(rt.redis, group_by, q.get("since"), q.get("until"))
    except ledger_report.BadQuery as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None


@get("/admin/ledger")
async def ledger_json(request: Request[Any, Any, Any]) -> ASGIResponse:
    """?since=YYYY-MM-DD&until=YYYY-MM-DD&group_by=day,tenant,tier — costs as exact decimal strings."""
    tasks = await _task_report(request)
    if tasks is not None:
        body = msgspec.json.encode({"group_by": tasks["group_by"], "data": tasks["rows"], **tasks}, enc_hook=str)
        return ASGIResponse(body=body, media_type=JSON)
    rows, group_by = await _ledger_rows(request)
    body = msgspec.json.encode({"group_by": group_by, "data": rows}, enc_hook=str)
    return ASGIResponse(body=body, media_type=JSON)


@get("/admin/ledger/gpu")
async def ledger_gpu(request: Request[Any, Any, Any]) -> ASGIResponse:
    """?since=YYYY-MM-DD&until=YYYY-MM-DD (default today) — GPU-hour cost per day and tier, used and idle."""
    rt = _guard(request)
    q = request.query_params
    try:
        days = await gpu_cost.report(
            rt.redis, rt.policy, q.get("since"), q.get("until"), archive=rt.settings.ledger_archive_url
        )
    except ledger_report.BadQuery as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    except ArchiveUnavailable:
        raise StateUnavailable("The ledger archive cannot be read right now.") from None
    return ASGIResponse(body=msgspec.json.encode({"data": gpu_cost.as_json(days)}), media_type=JSON)


@get("/admin/ledger.csv")
async def ledger_csv(request: Request[Any, Any, Any]) -> ASGIResponse:
    tasks = await _task_report(request)
    if tasks is not None:
        return ASGIResponse(
            body=evidence.render(tasks, "csv").encode(),
            media_type="text/csv",
            headers={"content-disposition": 'attachment; filename="ledger.csv"'},
        )
    rows, group_by = await _ledger_rows(request)
    return ASGIResponse(
        body=ledger_report.render(rows, group_by, "csv").encode(),
        media_type="text/csv",
        headers={"content-disposition": 'attachment; filename="ledger.csv"'},
    )


@get("/ledger")
async def ledger_page() -> ASGIResponse:
    """The finance page: served by the gateway itself (no CDN); its data comes from /admin/ledger
    with the admin token the person types in."""
    page = resources.files("gateway").joinpath("static", "ledger.html").read_bytes()
    return ASGIResponse(body=page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"})


ROUTES = [
    list_keys,
    create_key,
    revoke_key,
    get_policy,
    put_policy,
    route_explain,
    ledger_json,
    ledger_csv,
    ledger_gpu,
    ledger_page,
]
