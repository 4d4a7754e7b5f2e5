"""Admin routes: one table drives both the router and the OpenAPI document."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.admin.schemas import (
    CREDITS,
    ORG_PATCH,
    TIER_LIMIT,
    UNLIMITED,
    Field,
    body_schema,
    conflict,
    forbidden,
    not_found,
    read_body,
)
from proxy.appkeys import CLOCK, EXCHANGE, KEYS, SETTINGS, STORE
from proxy.auth import hash_key, key_from_headers, key_prefix, new_key
from proxy.errors import bad_request, unauthenticated
from proxy.ledger import PREPAID_PLANS
from proxy.money import format_usd
from proxy.store.base import IdempotencyConflict, OrgView

OWNER_ROLES = ("primary_owner", "owner")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls the admin API: the operator (everything) or an owner (their org only)."""

    operator: bool
    org_id: str | None = None

    def require_org(self, org_id: str) -> None:
        if not self.operator and self.org_id != org_id:
            raise forbidden("This key may manage only its own organisation.")


async def caller(request: web.Request) -> Caller:
    key = key_from_headers(request.headers)
    if not key:
        raise unauthenticated("Send the operator token or an owner's key.")
    token = request.app[SETTINGS].admin_token
    if token and hmac.compare_digest(key.encode(), token.encode()):
        return Caller(operator=True)
    seat = await request.app[KEYS].seat(key)
    if seat is None:
        raise unauthenticated("This key is not valid on this proxy (unknown or revoked).")
    request[EXCHANGE].seat = seat
    if seat.role not in OWNER_ROLES:
        raise forbidden("Only owners and primary owners manage organisations.")
    return Caller(operator=False, org_id=seat.org_id)


async def _org(request: web.Request) -> OrgView:
    org_id = request.match_info["org"]
    (await caller(request)).require_org(org_id)
    org = await request.app[STORE].get_org(org_id)
    if org is None:
        raise not_found(f"org: no organisation {org_id!r}")
    return org


def _limit(nanos: int | None) -> str:
    return UNLIMITED if nanos is None else format_usd(nanos)


def org_json(org: OrgView) -> dict[str, Any]:
    selected = [m.email for m in org.members if m.extra_usage_enabled]
    return {
        "id": org.id,
        "plan": org.plan,
        "timezone": org.timezone,
        "extra_usage": selected if org.extra_usage == "selected" else org.extra_usage,
        "monthly_spend_limit_usd": _limit(org.monthly_limit_nanos),
        "balance_usd": format_usd(org.balance_nanos) if org.plan in PREPAID_PLANS else None,
        "auto_reload": None
        if org.reload_amount_nanos is None
        else {
            "threshold_usd": format_usd(org.reload_threshold_nanos or 0),
            "amount_usd": format_usd(org.reload_amount_nanos),
        },
        "reservation": org.reservation,
        "webhook": {"url": org.webhook_url} if org.webhook_url else None,
        "tier_limits_usd": {tier: _limit(n) for tier, n in org.tier_limits.items()},
        "members": [
            {
                "email": m.email,
                "role": m.role,
                "tier": m.tier,
                "extra_usage": org.extra_usage == "all" or bool(m.extra_usage_enabled),
                "monthly_spend_limit_usd": None
                if m.monthly_limit_nanos is None
                else format_usd(m.monthly_limit_nanos),
                "extra_usage_consent": m.extra_usage_consent,
            }
            for m in org.members
        ],
    }


async def get_org(request: web.Request) -> web.Response:
    return web.json_response(org_json(await _org(request)))


async def patch_org(request: web.Request) -> web.Response:
    """Owners' settings: extra usage on/off and for whom, the monthly limit (effective on the
    next request), auto-reload, reservation mode, webhook."""
    org = await _org(request)
    body = read_body(await request.read(), ORG_PATCH)
    changes: dict[str, object] = {}
    members: tuple[str, ...] | None = None
    if "timezone" in body:
        changes["timezone"] = body["timezone"]
    if "extra_usage" in body:
        value = body["extra_usage"]
        if isinstance(value, tuple):
            known = {m.email for m in org.members}
            for email in value:
                if email not in known:
                    raise bad_request(f"extra_usage: {email!r} is not a member of {org.id!r}")
            changes["extra_usage"], members = "selected", value
        else:
            changes["extra_usage"] = value
    if "monthly_spend_limit_usd" in body:
        changes["monthly_limit_nanos"] = body["monthly_spend_limit_usd"]
    if "auto_reload" in body:
        if body["auto_reload"] is not None and org.plan not in PREPAID_PLANS:
            raise bad_request(f"auto_reload: {org.plan} is postpaid: no prepaid credits")
        threshold, amount = body["auto_reload"] or (None, None)
        changes.update(reload_threshold_nanos=threshold, reload_amount_nanos=amount)
    if "reservation" in body:
        changes["reservation"] = body["reservation"]
    if "webhook" in body:
        url, secret_env = body["webhook"] or (None, None)
        changes.update(webhook_url=url, webhook_secret_env=secret_env)
    await request.app[STORE].update_org(org.id, changes, members)
    return web.json_response(org_json(await _org(request)))


async def put_tier_limit(request: web.Request) -> web.Response:
    """Enterprise: the monthly limit of every member of a seat tier."""
    org = await _org(request)
    tier = request.match_info["tier"]
    if tier not in request.app[SETTINGS].plans.tiers:
        raise not_found(f"tier: no seat tier {tier!r} in plans.toml")
    if org.plan != "enterprise":
        raise bad_request("tier: seat-tier limits are for enterprise plans")
    body = read_body(await request.read(), TIER_LIMIT, required=("monthly_spend_limit_usd",))
    await request.app[STORE].set_tier_limit(org.id, tier, body["monthly_spend_limit_usd"])
    return web.json_response(org_json(await _org(request)))


async def post_credits(request: web.Request) -> web.Response:
    """Buy prepaid credits; the same idempotency_key returns the first purchase."""
    org = await _org(request)
    if org.plan not in PREPAID_PLANS:
        raise bad_request(f"org: {org.plan} is postpaid: extra usage is billed monthly")
    body = read_body(await request.read(), CREDITS, required=("amount_usd", "idempotency_key"))
    try:
        purchase = await request.app[STORE].purchase(
            org.id, body["amount_usd"], body["idempotency_key"], request.app[CLOCK].now_s()
        )
    except IdempotencyConflict as exc:
        raise conflict(
            f"idempotency_key: already used for ${format_usd(exc.first_amount_nanos)}"
        ) from None
    balance = (await request.app[STORE].get_org(org.id)).balance_nanos  # type: ignore[union-attr]
    return web.json_response(
        {
            "amount_usd": format_usd(purchase.amount_nanos),
            "replayed": purchase.replayed,
            "balance_usd": format_usd(balance),
        },
        status=200 if purchase.replayed else 201,
    )


async def post_member_key(request: web.Request) -> web.Response:
    """Issue a new key for a member; it is shown once, only its hash is kept."""
    org = await _org(request)
    email = request.match_info["email"]
    member_id = await request.app[STORE].member_id(org.id, email)
    if member_id is None:
        raise not_found(f"email: no member {email!r} in {org.id!r}")
    key = new_key()
    await request.app[STORE].issue_key(
        member_id, hash_key(key), key_prefix(key), request.app[CLOCK].now_s()
    )
    return web.json_response({"key": key, "prefix": key_prefix(key)}, status=201)


async def delete_key(request: web.Request) -> web.Response:
    """Revoke a key by its prefix; it stops working on this replica at once."""
    call = await caller(request)
    prefix = request.match_info["prefix"]
    store = request.app[STORE]
    org_id = await store.key_org(prefix)
    if org_id is None:
        raise not_found(f"prefix: no single live key starts with {prefix!r}")
    call.require_org(org_id)
    matched = await store.revoke_key(prefix, request.app[CLOCK].now_s())
    if matched != 1:
        raise conflict(f"prefix: {matched} live keys start with {prefix!r}; give more of it")
    request.app[KEYS].forget()
    return web.json_response({"revoked": prefix})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: dict[str, Field] | None = None
    required: tuple[str, ...] = ()
    ok_status: int = 200


ORG = "/admin/v1/orgs/{org}"
ROUTES = (
    Route("GET", ORG, get_org, "An organisation's settings, balance and members"),
    Route(
        "PATCH", ORG, patch_org, "Change extra usage, spend limit, auto-reload, webhook", ORG_PATCH
    ),
    Route(
        "PUT",
        ORG + "/tiers/{tier}/limit",
        put_tier_limit,
        "Set a seat tier's monthly limit (enterprise)",
        TIER_LIMIT,
        ("monthly_spend_limit_usd",),
    ),
    Route(
        "POST",
        ORG + "/credits",
        post_credits,
        "Buy prepaid credits (idempotent)",
        CREDITS,
        ("amount_usd", "idempotency_key"),
        201,
    ),
    Route(
        "POST",
        ORG + "/members/{email}/keys",
        post_member_key,
        "Issue a key for a member (shown once)",
        ok_status=201,
    ),
    Route("DELETE", "/admin/v1/keys/{prefix}", delete_key, "Revoke a key by its prefix"),
)


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of exactly the routes above."""
    error = {
        "description": "error",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["type", "error"],
                    "properties": {
                        "type": {"const": "error"},
                        "error": {
                            "type": "object",
                            "required": ["type", "message"],
                            "properties": {
                                "type": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                    },
                }
            }
        },
    }
    paths: dict[str, Any] = {}
    for route in ROUTES:
        names = [part[1:-1] for part in route.path.split("/") if part.startswith("{")]
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "security": [{"bearer": []}],
            "parameters": [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                for n in names
            ],
            "responses": {
                str(route.ok_status): {
                    "description": "ok",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **{str(code): error for code in (400, 401, 403, 404, 409)},
            },
        }
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": body_schema(route.body, route.required)}
                },
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "usage-proxy admin API", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi())


def setup(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.router.add_get("/admin/v1/openapi.json", openapi_json)
