"""Who calls the admin API (or the web pages), and what they may touch: operators everything,
owners their org."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from proxy.admin.schemas import forbidden, not_found
from proxy.appkeys import EXCHANGE, KEYS, SETTINGS, STORE
from proxy.auth import key_from_headers
from proxy.errors import unauthenticated
from proxy.store.base import OrgView, Seat

OWNER_ROLES = ("primary_owner", "owner")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls the admin API: the operator (everything) or an owner (their org only)."""

    operator: bool
    org_id: str | None = None
    role: str | None = None  # the owner's role; None for the operator

    def require_org(self, org_id: str) -> None:
        if not self.operator and self.org_id != org_id:
            raise forbidden("This key may manage only its own organisation.")


async def caller(request: web.Request) -> Caller:
    key = key_from_headers(request.headers)
    if not key:
        raise unauthenticated("Send the operator token or an owner's key.")
    if is_operator_token(request.app, key):
        return Caller(operator=True)
    seat = await request.app[KEYS].seat(key)
    if seat is None:
        raise unauthenticated("This key is not valid on this proxy (unknown or revoked).")
    request[EXCHANGE].seat = seat
    return owner_caller(seat)


def is_operator_token(app: web.Application, key: str) -> bool:
    """The operator token, compared in constant time (never when none is configured)."""
    token = app[SETTINGS].admin_token
    return bool(token) and hmac.compare_digest(key.encode(), token.encode())


def owner_caller(seat: Seat) -> Caller:
    """A seat's right to manage its organisation: owners and primary owners only."""
    if seat.role not in OWNER_ROLES:
        raise forbidden("Only owners and primary owners manage organisations.")
    return Caller(operator=False, org_id=seat.org_id, role=seat.role)


async def authorised_org(app: web.Application, call: Caller, org_id: str) -> OrgView:
    """The organisation `call` may manage (403 for another org's owner, 404 when none)."""
    call.require_org(org_id)
    org = await app[STORE].get_org(org_id)
    if org is None:
        raise not_found(f"org: no organisation {org_id!r}")
    return org


async def org_of(request: web.Request) -> OrgView:
    return (await org_and_caller(request))[0]


async def org_and_caller(request: web.Request) -> tuple[OrgView, Caller]:
    call = await caller(request)
    return await authorised_org(request.app, call, request.match_info["org"]), call
