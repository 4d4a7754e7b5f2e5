"""The admin route table: one table drives both the router and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.admin.members import create_member, delete_member, patch_member
from proxy.admin.orgs import (
    create_org,
    delete_key,
    get_member_keys,
    get_org,
    patch_org,
    post_credits,
    post_member_key,
    put_tier_limit,
)
from proxy.admin.reports import (
    STATEMENT_QUERY,
    USAGE_QUERY,
    get_alerts,
    get_statement,
    get_usage,
)
from proxy.admin.schemas import (
    CREDITS,
    MEMBER_CREATE,
    MEMBER_PATCH,
    ORG_CREATE,
    ORG_PATCH,
    TIER_LIMIT,
    Field,
    body_schema,
)

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
    replay_status: int | None = None  # an idempotent replay answers this instead
    query: tuple[str, ...] = ()  # optional query parameters
    csv: bool = False  # also answers text/csv (format=csv)


ORG = "/admin/v1/orgs/{org}"
ROUTES = (
    Route(
        "POST",
        "/admin/v1/orgs",
        create_org,
        "Create an organisation (operator)",
        ORG_CREATE,
        ("id", "plan"),
        201,
    ),
    Route("GET", ORG, get_org, "An organisation's settings, balance and members"),
    Route(
        "POST",
        ORG + "/members",
        create_member,
        "Add a member; the key is shown once",
        MEMBER_CREATE,
        ("email",),
        201,
    ),
    Route(
        "PATCH",
        ORG + "/members/{email}",
        patch_member,
        "Change a member's tier, role, extra usage, limit or consent",
        MEMBER_PATCH,
    ),
    Route("DELETE", ORG + "/members/{email}", delete_member, "Remove a member (keys revoked)"),
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
        ok_status=201,
        replay_status=200,
    ),
    Route(
        "POST",
        ORG + "/members/{email}/keys",
        post_member_key,
        "Issue a key for a member (shown once)",
        ok_status=201,
    ),
    Route("GET", ORG + "/members/{email}/keys", get_member_keys, "A member's keys, by prefix only"),
    Route("DELETE", "/admin/v1/keys/{prefix}", delete_key, "Revoke a key by its prefix"),
    Route(
        "GET",
        ORG + "/usage",
        get_usage,
        "Usage between two local dates (default: month to date) by member, model or day",
        query=USAGE_QUERY,
    ),
    Route("GET", ORG + "/alerts", get_alerts, "The usage alerts the organisation has had"),
    Route(
        "GET",
        ORG + "/statements/{month}",
        get_statement,
        "A month's statement (YYYY-MM): extra usage per member and model, credits, totals; "
        "format=csv for CSV",
        query=STATEMENT_QUERY,
        csv=True,
    ),
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
                *(
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                    for n in names
                ),
                *(
                    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                    for n in route.query
                ),
            ],
            "responses": {
                str(route.ok_status): {
                    "description": "ok",
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        **({"text/csv": {"schema": {"type": "string"}}} if route.csv else {}),
                    },
                },
                **(
                    {
                        str(route.replay_status): {
                            "description": "replayed: nothing new was done",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    }
                    if route.replay_status
                    else {}
                ),
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
