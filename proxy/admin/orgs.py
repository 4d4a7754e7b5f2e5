"""Admin handlers for an organisation's settings, credits, tier limits and keys."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.admin.access import caller, org_of
from proxy.admin.schemas import (
    CREDITS,
    ORG_CREATE,
    ORG_PATCH,
    TIER_LIMIT,
    UNLIMITED,
    conflict,
    forbidden,
    not_found,
    read_body,
)
from proxy.appkeys import CLOCK, KEYS, SETTINGS, STORE
from proxy.auth import VISIBLE_PREFIX_CHARS, hash_key, key_prefix, new_key
from proxy.errors import bad_request
from proxy.ledger import PREPAID_PLANS
from proxy.money import format_usd
from proxy.refusals import rfc3339
from proxy.store.base import IdempotencyConflict, MemberView, OrgView


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
        "members": [member_json(org, m) for m in org.members],
    }


def member_json(org: OrgView, m: MemberView) -> dict[str, Any]:
    return {
        "email": m.email,
        "role": m.role,
        "tier": m.tier,
        "extra_usage": org.extra_usage == "all" or bool(m.extra_usage_enabled),
        "monthly_spend_limit_usd": None
        if m.monthly_limit_nanos is None
        else format_usd(m.monthly_limit_nanos),
        "extra_usage_consent": m.extra_usage_consent,
    }


async def create_org(request: web.Request) -> web.Response:
    """Operators only: a new organisation (then PATCH its settings, add members)."""
    if not (await caller(request)).operator:
        raise forbidden("Only the operator creates organisations.")
    body = read_body(await request.read(), ORG_CREATE, required=("id", "plan"))
    store = request.app[STORE]
    created = await store.create_org(
        body["id"], body["plan"], body.get("timezone", "UTC"), request.app[CLOCK].now_s()
    )
    if not created:
        raise conflict(f"id: an organisation {body['id']!r} exists already")
    return web.json_response(org_json(await store.get_org(body["id"])), status=201)


async def get_org(request: web.Request) -> web.Response:
    return web.json_response(org_json(await org_of(request)))


async def patch_org(request: web.Request) -> web.Response:
    org = await org_of(request)
    body = read_body(await request.read(), ORG_PATCH)
    return web.json_response(org_json(await change_org(request.app, org, body)))


async def change_org(app: web.Application, org: OrgView, body: dict[str, Any]) -> OrgView:
    """Owners' settings (a body parsed with ORG_PATCH): extra usage on/off and for whom, the
    monthly limit (effective on the next request), auto-reload, reservation mode, webhook."""
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
    await app[STORE].update_org(org.id, changes, members)
    return await _reread(app, org.id)


async def put_tier_limit(request: web.Request) -> web.Response:
    org = await org_of(request)
    tier = request.match_info["tier"]
    check_tier_limit(request.app, org, tier)
    body = read_body(await request.read(), TIER_LIMIT, required=("monthly_spend_limit_usd",))
    org = await set_tier_limit(request.app, org, tier, body["monthly_spend_limit_usd"])
    return web.json_response(org_json(org))


def check_tier_limit(app: web.Application, org: OrgView, tier: str) -> None:
    if tier not in app[SETTINGS].plans.tiers:
        raise not_found(f"tier: no seat tier {tier!r} in plans.toml")
    if org.plan != "enterprise":
        raise bad_request("tier: seat-tier limits are for enterprise plans")


async def set_tier_limit(
    app: web.Application, org: OrgView, tier: str, limit_nanos: int | None
) -> OrgView:
    """Enterprise: the monthly limit of every member of a seat tier (None: unlimited)."""
    check_tier_limit(app, org, tier)
    await app[STORE].set_tier_limit(org.id, tier, limit_nanos)
    return await _reread(app, org.id)


async def post_credits(request: web.Request) -> web.Response:
    org = await org_of(request)
    check_prepaid(org)
    body = read_body(await request.read(), CREDITS, required=("amount_usd", "idempotency_key"))
    bought = await buy_credits(request.app, org, body)
    return web.json_response(bought, status=200 if bought["replayed"] else 201)


def check_prepaid(org: OrgView) -> None:
    if org.plan not in PREPAID_PLANS:
        raise bad_request(f"org: {org.plan} is postpaid: extra usage is billed monthly")


async def buy_credits(app: web.Application, org: OrgView, body: dict[str, Any]) -> dict[str, Any]:
    """Buy prepaid credits (a body parsed with CREDITS); the same idempotency_key returns the
    first purchase."""
    check_prepaid(org)
    try:
        purchase = await app[STORE].purchase(
            org.id, body["amount_usd"], body["idempotency_key"], app[CLOCK].now_s()
        )
    except IdempotencyConflict as exc:
        raise conflict(
            f"idempotency_key: already used for ${format_usd(exc.first_amount_nanos)}"
        ) from None
    return {
        "amount_usd": format_usd(purchase.amount_nanos),
        "replayed": purchase.replayed,
        "balance_usd": format_usd((await _reread(app, org.id)).balance_nanos),
    }


async def _reread(app: web.Application, org_id: str) -> OrgView:
    org = await app[STORE].get_org(org_id)
    assert org is not None  # orgs are never deleted
    return org


async def post_member_key(request: web.Request) -> web.Response:
    """Issue a new key for a member; it is shown once, only its hash is kept."""
    org = await org_of(request)
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
        raise not_found(  # a prefix is matched whole: a longer string is no prefix
            f"prefix: {prefix!r} is not the prefix of one live key (a key's prefix is its first "
            f"{VISIBLE_PREFIX_CHARS} characters, as its member's key list shows it)"
        )
    call.require_org(org_id)
    matched = await store.revoke_key(prefix, request.app[CLOCK].now_s())
    if matched != 1:
        raise conflict(f"prefix: {matched} live keys start with {prefix!r}; give more of it")
    request.app[KEYS].forget()
    return web.json_response({"revoked": prefix})


async def get_member_keys(request: web.Request) -> web.Response:
    """A member's keys, by their visible prefix only (the keys themselves are not kept)."""
    org = await org_of(request)
    email = request.match_info["email"]
    if await request.app[STORE].member_id(org.id, email) is None:
        raise not_found(f"email: no member {email!r} in {org.id!r}")
    keys = await request.app[STORE].list_keys(org.id, email)
    return web.json_response(
        {
            "keys": [
                {
                    "prefix": prefix,
                    "created_at": rfc3339(created_s),
                    "revoked_at": rfc3339(revoked_s) if revoked_s is not None else None,
                }
                for prefix, created_s, revoked_s in keys
            ]
        }
    )
