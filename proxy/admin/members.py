"""Admin handlers for seats: add a member (key shown once), change one, remove one."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.admin.access import Caller, org_and_caller
from proxy.admin.orgs import member_json
from proxy.admin.schemas import (
    MEMBER_CREATE,
    MEMBER_PATCH,
    conflict,
    forbidden,
    not_found,
    read_body,
)
from proxy.appkeys import CLOCK, KEYS, SETTINGS, STORE
from proxy.auth import hash_key, key_prefix, new_key
from proxy.errors import bad_request
from proxy.store.base import MemberView, OrgView


def _columns(request: web.Request, org: OrgView, body: dict[str, Any]) -> dict[str, object]:
    """Request fields (orgs.toml names) as member columns, checked against plans and the plan."""
    columns: dict[str, object] = {}
    for name in ("role", "tier", "extra_usage_consent"):
        if name in body:
            columns[name] = body[name]
    if "tier" in body and body["tier"] not in request.app[SETTINGS].plans.tiers:
        raise bad_request(f"tier: no seat tier {body['tier']!r} in plans.toml")
    if "extra_usage" in body:
        columns["extra_usage_enabled"] = int(body["extra_usage"])
    if "monthly_spend_limit_usd" in body:
        if org.plan != "enterprise" and body["monthly_spend_limit_usd"] is not None:
            raise bad_request("monthly_spend_limit_usd: member limits are for enterprise plans")
        columns["monthly_limit_nanos"] = body["monthly_spend_limit_usd"]
    return columns


def _guard_primary_owner(call: Caller, target: MemberView | None, new_role: object) -> None:
    """Owners cannot touch the primary owner, nor make one: only the primary owner or the
    operator can."""
    if call.operator or call.role == "primary_owner":
        return
    if target is not None and target.role == "primary_owner":
        raise forbidden("Only the primary owner or the operator can change the primary owner.")
    if new_role == "primary_owner":
        raise forbidden("Only the primary owner or the operator can name a primary owner.")


def _member(org: OrgView, email: str) -> MemberView:
    found = next((m for m in org.members if m.email == email), None)
    if found is None:
        raise not_found(f"email: no member {email!r} in {org.id!r}")
    return found


async def create_member(request: web.Request) -> web.Response:
    """A new seat: answers {"member": ..., "key": ...}; the key is shown this once."""
    org, call = await org_and_caller(request)
    body = read_body(await request.read(), MEMBER_CREATE, required=("email",))
    _guard_primary_owner(call, None, body.get("role"))
    columns = {"role": "member", "tier": "standard", **_columns(request, org, body)}
    if columns["tier"] not in request.app[SETTINGS].plans.tiers:
        raise bad_request("tier: required (plans.toml has no 'standard' tier)")
    store, now_s = request.app[STORE], request.app[CLOCK].now_s()
    member_id = await store.create_member(org.id, body["email"], columns, now_s)
    if member_id is None:
        raise conflict(f"email: {body['email']!r} already has a seat in {org.id!r}")
    key = new_key()
    await store.issue_key(member_id, hash_key(key), key_prefix(key), now_s)
    org = await store.get_org(org.id)
    assert org is not None
    return web.json_response(
        {"member": member_json(org, _member(org, body["email"])), "key": key}, status=201
    )


async def patch_member(request: web.Request) -> web.Response:
    org, call = await org_and_caller(request)
    target = _member(org, request.match_info["email"])
    body = read_body(await request.read(), MEMBER_PATCH)
    _guard_primary_owner(call, target, body.get("role"))
    await request.app[STORE].update_member(org.id, target.email, _columns(request, org, body))
    request.app[KEYS].forget()  # role and tier travel with cached seats
    org = await request.app[STORE].get_org(org.id)
    assert org is not None
    return web.json_response({"member": member_json(org, _member(org, target.email))})


async def delete_member(request: web.Request) -> web.Response:
    """The seat ends now: its keys stop working; its usage records and transfers stay."""
    org, call = await org_and_caller(request)
    target = _member(org, request.match_info["email"])
    _guard_primary_owner(call, target, None)
    await request.app[STORE].remove_member(org.id, target.email, request.app[CLOCK].now_s())
    request.app[KEYS].forget()
    return web.json_response({"removed": target.email})
