"""The web pages: each reads and changes through the admin API's own functions, authorised by
the admin API's own rules (proxy.admin.access); only the form fields and the HTML are theirs."""

from __future__ import annotations

import functools
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web
from multidict import MultiDictProxy

from proxy.admin.access import (
    OWNER_ROLES,
    Caller,
    authorised_org,
    is_operator_token,
    owner_caller,
)
from proxy.admin.orgs import buy_credits, change_org, check_tier_limit, org_json, set_tier_limit
from proxy.admin.reports import (
    local_date,
    month_to_date,
    posted_usage,
    statement_csv_response,
    statement_of,
)
from proxy.admin.schemas import (
    CREDITS,
    ORG_PATCH,
    TIER_LIMIT,
    UNLIMITED,
    not_found,
    parse_fields,
)
from proxy.appkeys import CLOCK, EXCHANGE, KEYS, SESSIONS, SETTINGS, STORE
from proxy.auth import hash_key
from proxy.errors import Refusal
from proxy.handlers import continue_for, usage_of
from proxy.ledger import PREPAID_PLANS
from proxy.money import format_usd, usd_to_nanos
from proxy.refusals import reset_phrase
from proxy.store.base import OrgView, Seat
from proxy.ui.chart import daily_chart
from proxy.ui.sessions import COOKIE, CSRF_FIELD, SESSION_TTL_S, Session, Sessions

log = structlog.get_logger("proxy.ui")

LOGIN_PATH = "/ui/login"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}
STATEMENT_MONTHS = 6  # months listed on the statements page
WINDOW_NAMES = {"session": "Session", "weekly": "Weekly"}
ALERT_KINDS = {
    "session": "Session window",
    "member_monthly": "Member monthly limit",
    "org_monthly": "Organisation monthly limit",
    "balance_low": "Balance low",
    "auto_reload": "Auto-reload",
    "auto_reload_failed": "Auto-reload failed",
}


@dataclass(frozen=True, slots=True)
class Visitor:
    """Who is signed in: a seat (member or owner), or the operator (no seat)."""

    session: Session
    seat: Seat | None

    def caller(self) -> Caller:
        """The admin API's caller for this visitor: the operator, or an owner (else 403)."""
        return Caller(operator=True) if self.seat is None else owner_caller(self.seat)


Page = Callable[[web.Request, Visitor], Awaitable[web.StreamResponse]]
Action = Callable[[web.Request, Visitor, MultiDictProxy], Awaitable[web.StreamResponse]]


# --- frame: sessions, CSRF, rendering ---------------------------------------------------------


async def _visitor(request: web.Request) -> Visitor | None:
    """The signed-in visitor, checked again on every request: a revoked key, a removed seat or
    a lost role ends what the session may do at once."""
    session = request.app[SESSIONS].find(request.cookies.get(COOKIE))
    if session is None or not session.signed_in:
        return None
    if session.operator:
        return Visitor(session, None)
    assert session.key_sha256 is not None
    seat = await request.app[KEYS].seat_by_hash(session.key_sha256)
    if seat is None:
        request.app[SESSIONS].end(session.id)
        return None
    request[EXCHANGE].seat = seat
    return Visitor(session, seat)


def page(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A GET page for signed-in visitors (else to the sign-in form)."""

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        visitor = await _visitor(request)
        if visitor is None:
            return redirect(LOGIN_PATH)
        try:
            return await handler(request, visitor)
        except Refusal as refusal:
            return error_page(request, visitor, refusal)

    return run


def action(handler: Action) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A form POST: refused unless it carries the session's CSRF token."""

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        visitor = await _visitor(request)
        form = await request.post()
        if visitor is None:
            return error_page(
                request,
                None,
                Refusal(401, "authentication_error", SIGNED_OUT, outcome="unauthenticated"),
            )
        if not visitor.session.csrf_ok(form.get(CSRF_FIELD)):
            return error_page(request, visitor, _csrf_refusal())
        try:
            return await handler(request, visitor, form)
        except Refusal as refusal:
            return error_page(request, visitor, refusal)

    return run


SIGNED_OUT = "You are not signed in (or your sign-in has ended). Sign in and try again."


def _csrf_refusal() -> Refusal:
    return Refusal(
        403,
        "permission_error",
        "This form was not sent from a page of this proxy (its CSRF token is missing or "
        "wrong). Reload the page and try again.",
        outcome="csrf_refused",
    )


def render(
    request: web.Request,
    template: str,
    visitor: Visitor | None,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    session: Session | None = None,
) -> web.Response:
    session = session or (visitor.session if visitor else None)
    who = None
    if visitor is not None:
        seat = visitor.seat
        who = {
            "operator": seat is None,
            "email": seat.email if seat else None,
            "role": seat.role if seat else None,
            "org": seat.org_id if seat else None,
            "owner": seat is None or seat.role in OWNER_ROLES,
        }
    response = aiohttp_jinja2.render_template(
        template,
        request,
        {
            "who": who,
            "csrf_field": CSRF_FIELD,
            "csrf_token": session.csrf_token if session else "",
            "notice": session.pop_notice() if session else None,
            **context,
        },
        status=status,
    )
    response.headers.update(HEADERS)
    return response


def error_page(request: web.Request, visitor: Visitor | None, refusal: Refusal) -> web.Response:
    log.info("ui_refused", status=refusal.status, outcome=refusal.outcome)
    request[EXCHANGE].outcome = refusal.outcome
    titles = {400: "That did not work", 401: "Please sign in", 403: "Not allowed here"}
    return render(
        request,
        "error.html",
        visitor,
        {"title": titles.get(refusal.status, "Something went wrong"), "message": refusal.message},
        status=refusal.status,
    )


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"location": location, **HEADERS})


def _set_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    response.set_cookie(
        COOKIE,
        session.id,
        path="/ui",
        httponly=True,
        samesite="Strict",
        secure=request.app[SETTINGS].server.public_url.startswith("https://"),
        max_age=SESSION_TTL_S,
    )


def _saved(visitor: Visitor, notice: str, location: str) -> web.Response:
    visitor.session.notice = notice
    return redirect(location)


# --- sign-in ----------------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.StreamResponse:
    """The sign-in form; its session (not signed in yet) holds the form's CSRF token."""
    sessions = request.app[SESSIONS]
    session = sessions.find(request.cookies.get(COOKIE))
    if session is not None and session.signed_in:
        return redirect("/ui/")
    fresh = session is None
    session = session or sessions.begin()
    response = render(request, "login.html", None, {"error": None}, session=session)
    if fresh:
        _set_cookie(request, response, session)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """Sign in with a member's or owner's key, or the operator token (the form field `key`)."""
    sessions = request.app[SESSIONS]
    form = await request.post()
    session = sessions.find(request.cookies.get(COOKIE))
    if session is None or not session.csrf_ok(form.get(CSRF_FIELD)):
        return error_page(request, None, _csrf_refusal())
    key = str(form.get("key", "")).strip()
    signed_in: Session | None = None
    if key and is_operator_token(request.app, key):
        signed_in = sessions.begin(operator=True)
        log.info("ui_signed_in", operator=True)
    elif key:
        seat = await request.app[KEYS].seat(key)
        if seat is not None:
            request[EXCHANGE].seat = seat
            signed_in = sessions.begin(key_sha256=hash_key(key))
            log.info("ui_signed_in", org=seat.org_id, member=seat.email, role=seat.role)
    if signed_in is None:
        request[EXCHANGE].outcome = "unauthenticated"
        error = (
            "This key is not valid on this proxy (unknown or revoked)."
            if key
            else "Enter your key."
        )
        return render(request, "login.html", None, {"error": error}, status=401, session=session)
    sessions.end(session.id)  # a new id on sign-in: the form's session is never promoted
    response = redirect("/ui/")
    _set_cookie(request, response, signed_in)
    return response


@action
async def logout(request: web.Request, visitor: Visitor, form: MultiDictProxy) -> web.Response:
    request.app[SESSIONS].end(visitor.session.id)
    response = redirect(LOGIN_PATH)
    response.del_cookie(COOKIE, path="/ui")
    return response


@page
async def home(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    if visitor.seat is None:
        wanted = request.query.get("org", "").strip()
        if wanted:
            return redirect(f"/ui/orgs/{quote(wanted, safe='')}")
        return render(request, "operator.html", visitor, {})
    if visitor.seat.role in OWNER_ROLES:
        return redirect(f"/ui/orgs/{visitor.seat.org_id}")
    return redirect("/ui/me")


# --- owners: pages ----------------------------------------------------------------------------


async def _org(request: web.Request, visitor: Visitor) -> OrgView:
    """The org of the path, as the admin API authorises it (owners: their own only)."""
    return await authorised_org(request.app, visitor.caller(), request.match_info["org"])


def _org_context(request: web.Request, org: OrgView, nav: str) -> dict[str, Any]:
    tiers = [t for t in request.app[SETTINGS].plans.tiers if t != "max"]  # max: its own plan
    return {
        "org": org_json(org),
        "nav": nav,
        "prepaid": org.plan in PREPAID_PLANS,
        "seat_tiers": tiers if org.plan == "enterprise" else [],
    }


@page
async def overview(request: web.Request, visitor: Visitor) -> web.Response:
    """Plan, balance, month-to-date extra usage against the limit, and daily spend."""
    org = await _org(request, visitor)
    zone = ZoneInfo(org.timezone)
    first, today = month_to_date(org, request.app[CLOCK].now_s())
    spend_nanos: defaultdict[tuple[date, str, str], int] = defaultdict(int)
    for row in await posted_usage(request.app, org, first, today, by_day=True):
        spend_nanos[(local_date(row, zone), row.member, row.model)] += row.cost_nanos
    days = [first + timedelta(days=n) for n in range((today - first).days + 1)]
    statement = await statement_of(request.app, org, f"{first:%Y-%m}")
    return render(
        request,
        "overview.html",
        visitor,
        {
            **_org_context(request, org, "overview"),
            "month": f"{first:%B %Y}",
            "extra_month_usd": statement["usage_total_usd"],
            "chart": daily_chart(days, spend_nanos),
        },
    )


@page
async def usage(request: web.Request, visitor: Visitor) -> web.Response:
    """Settings > Usage: extra usage, spend limit, seat-tier limits, auto-reload, credits."""
    org = await _org(request, visitor)
    return render(
        request,
        "usage.html",
        visitor,
        {**_org_context(request, org, "usage"), "idempotency_key": _purchase_key()},
    )


@page
async def spend_limit_form(request: web.Request, visitor: Visitor) -> web.Response:
    """The Adjust-limit dialog as a page of its own (browsers without JavaScript)."""
    org = await _org(request, visitor)
    return render(
        request, "limit.html", visitor, {**_org_context(request, org, "usage"), "tier": None}
    )


@page
async def tier_limit_form(request: web.Request, visitor: Visitor) -> web.Response:
    org = await _org(request, visitor)
    tier = request.match_info["tier"]
    check_tier_limit(request.app, org, tier)
    return render(
        request, "limit.html", visitor, {**_org_context(request, org, "usage"), "tier": tier}
    )


@page
async def members(request: web.Request, visitor: Visitor) -> web.Response:
    """Every seat with its tier, role, session usage, month spend, limit and extra usage."""
    org = await _org(request, visitor)
    store = request.app[STORE]
    rows = []
    for member in org_json(org)["members"]:
        member_id = await store.member_id(org.id, member["email"])
        if member_id is None:  # removed between the two reads
            continue
        seat = Seat(
            member_id=member_id,
            org_id=org.id,
            email=member["email"],
            role=member["role"],
            tier=member["tier"],
            plan=org.plan,
            timezone=org.timezone,
        )
        rows.append({**member, "usage": await usage_of(request.app, seat)})
    return render(
        request, "members.html", visitor, {**_org_context(request, org, "members"), "rows": rows}
    )


@page
async def alerts(request: web.Request, visitor: Visitor) -> web.Response:
    org = await _org(request, visitor)
    found = await request.app[STORE].list_alerts(org.id)
    return render(
        request,
        "alerts.html",
        visitor,
        {**_org_context(request, org, "alerts"), "alerts": found[::-1], "kinds": ALERT_KINDS},
    )


@page
async def statements(request: web.Request, visitor: Visitor) -> web.Response:
    """A month's statement (default: this month), with the CSV to download."""
    org = await _org(request, visitor)
    first, _ = month_to_date(org, request.app[CLOCK].now_s())
    month = request.query.get("month", f"{first:%Y-%m}")
    statement = await statement_of(request.app, org, month)
    months = []
    for _ in range(STATEMENT_MONTHS):
        months.append(f"{first:%Y-%m}")
        first = (first - timedelta(days=1)).replace(day=1)
    return render(
        request,
        "statements.html",
        visitor,
        {
            **_org_context(request, org, "statements"),
            "statement": statement,
            "month": month,
            "months": months,
        },
    )


@page
async def statement_csv(request: web.Request, visitor: Visitor) -> web.Response:
    org = await _org(request, visitor)
    month = request.match_info["month"]
    response = statement_csv_response(org, month, await statement_of(request.app, org, month))
    response.headers.update({k: v for k, v in HEADERS.items() if k != "content-security-policy"})
    return response


# --- owners: actions (each one admin API function) --------------------------------------------


def _usage_page(org: OrgView, section: str) -> str:
    return f"/ui/orgs/{org.id}/usage#{section}"


def _amount(form: MultiDictProxy, name: str) -> str:
    """A USD amount as typed: spaces and a leading "$" are fine; the admin parser does the rest."""
    return str(form.get(name, "")).strip().removeprefix("$").strip()


@action
async def set_extra_usage(
    request: web.Request, visitor: Visitor, form: MultiDictProxy
) -> web.Response:
    """Enable / Disable, and for whom: the whole organisation or selected members (Team)."""
    org = await _org(request, visitor)
    choice = form.get("extra_usage")
    value: object = choice
    if choice == "selected":
        value = [str(email) for email in form.getall("member", [])]
    body = parse_fields({"extra_usage": value}, ORG_PATCH)
    org = await change_org(request.app, org, body)
    state = org_json(org)["extra_usage"]
    if state == "off":
        notice = "Extra usage is off."
    elif state == "all":
        notice = "Extra usage is on for the whole organisation."
    else:
        notice = f"Extra usage is on for {len(state)} selected member(s)."
    return _saved(visitor, notice, _usage_page(org, "extra-usage"))


def _limit_value(form: MultiDictProxy) -> str:
    return UNLIMITED if form.get("to") == UNLIMITED else _amount(form, "amount_usd")


def _limit_notice(what: str, limit_usd: str) -> str:
    return f"{what} is now {'Unlimited' if limit_usd == UNLIMITED else '$' + limit_usd}."


@action
async def set_spend_limit(
    request: web.Request, visitor: Visitor, form: MultiDictProxy
) -> web.Response:
    """Set limit / Set to unlimited: the org's monthly limit, effective on the next request."""
    org = await _org(request, visitor)
    body = parse_fields({"monthly_spend_limit_usd": _limit_value(form)}, ORG_PATCH)
    org = await change_org(request.app, org, body)
    notice = _limit_notice("The monthly spend limit", org_json(org)["monthly_spend_limit_usd"])
    return _saved(visitor, notice, _usage_page(org, "spend-limit"))


@action
async def set_seat_tier_limit(
    request: web.Request, visitor: Visitor, form: MultiDictProxy
) -> web.Response:
    org = await _org(request, visitor)
    tier = request.match_info["tier"]
    check_tier_limit(request.app, org, tier)
    body = parse_fields({"monthly_spend_limit_usd": _limit_value(form)}, TIER_LIMIT)
    org = await set_tier_limit(request.app, org, tier, body["monthly_spend_limit_usd"])
    limit_usd = org_json(org)["tier_limits_usd"].get(tier, UNLIMITED)
    notice = _limit_notice(f"The {tier.capitalize()} limit", limit_usd)
    return _saved(visitor, notice, _usage_page(org, "tier-limits"))


@action
async def set_auto_reload(
    request: web.Request, visitor: Visitor, form: MultiDictProxy
) -> web.Response:
    org = await _org(request, visitor)
    value: object = "off"
    if form.get("to") != "off":
        value = {
            "threshold_usd": _amount(form, "threshold_usd"),
            "amount_usd": _amount(form, "amount_usd"),
        }
    org = await change_org(request.app, org, parse_fields({"auto_reload": value}, ORG_PATCH))
    reload = org_json(org)["auto_reload"]
    notice = (
        "Auto-reload is off."
        if reload is None
        else f"Auto-reload buys ${reload['amount_usd']} when the balance reaches "
        f"${reload['threshold_usd']}."
    )
    return _saved(visitor, notice, _usage_page(org, "auto-reload"))


def _purchase_key() -> str:
    """One per rendered form: sending the same form twice buys once."""
    return "ui-" + secrets.token_urlsafe(16)


@action
async def buy(request: web.Request, visitor: Visitor, form: MultiDictProxy) -> web.Response:
    org = await _org(request, visitor)
    values = {
        "amount_usd": _amount(form, "amount_usd"),
        "idempotency_key": str(form.get("idempotency_key", "")),
    }
    bought = await buy_credits(
        request.app, org, parse_fields(values, CREDITS, required=tuple(values))
    )
    notice = (
        f"That purchase was already made (${bought['amount_usd']}); nothing new was bought."
        if bought["replayed"]
        else f"Bought ${bought['amount_usd']} of credits. The balance is ${bought['balance_usd']}."
    )
    return _saved(visitor, notice, _usage_page(org, "credits"))


# --- members: their own usage -----------------------------------------------------------------


def _seat(visitor: Visitor) -> Seat:
    if visitor.seat is None:
        raise not_found("The operator has no seat: open an organisation's pages instead.")
    return visitor.seat


def _bar(kind: str, window: Mapping[str, Any] | None, timezone: str) -> dict[str, Any] | None:
    if window is None:
        return None
    resets_at = window["resets_at"]
    return {
        "name": WINDOW_NAMES[kind],
        "id": kind,
        **window,
        "exhausted": resets_at is not None and usd_to_nanos(window["remaining_usd"]) == 0,
        "resets": None
        if resets_at is None
        else reset_phrase(datetime.fromisoformat(resets_at).timestamp(), timezone),
    }


@page
async def me(request: web.Request, visitor: Visitor) -> web.Response:
    """A member's Session and Weekly bars, extra usage, and Continue when blocked."""
    seat = _seat(visitor)
    view = await usage_of(request.app, seat)
    bars = [_bar(kind, view[kind], seat.timezone) for kind in ("session", "weekly")]
    extra = view["extra_usage"]
    own = [
        a for a in await request.app[STORE].list_alerts(seat.org_id) if a["member"] == seat.email
    ]
    consent_until = extra["consent_until"]
    return render(
        request,
        "me.html",
        visitor,
        {
            "nav": "me",
            "view": view,
            "session_bar": bars[0],
            "weekly_bar": bars[1],
            "blocked": any(b is not None and b["exhausted"] for b in bars),
            "extra": extra,
            "consent_until": None
            if consent_until is None
            else reset_phrase(datetime.fromisoformat(consent_until).timestamp(), seat.timezone),
            "alerts": own[::-1],
            "kinds": ALERT_KINDS,
        },
    )


@action
async def continue_extra(
    request: web.Request, visitor: Visitor, form: MultiDictProxy
) -> web.Response:
    """Continue with extra usage: the same step as POST /v1/extra-usage/continue."""
    answer = await continue_for(request.app, _seat(visitor))
    return _saved(visitor, answer["message"], "/ui/me")


# --- wiring -----------------------------------------------------------------------------------

ORG = "/ui/orgs/{org}"
ROUTES: tuple[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]], ...] = (
    ("GET", LOGIN_PATH, login_form),
    ("POST", LOGIN_PATH, login),
    ("POST", "/ui/logout", logout),
    ("GET", "/ui/", home),
    ("GET", "/ui/me", me),
    ("POST", "/ui/me/continue", continue_extra),
    ("GET", ORG, overview),
    ("GET", ORG + "/usage", usage),
    ("GET", ORG + "/usage/spend-limit", spend_limit_form),
    ("GET", ORG + "/usage/tiers/{tier}", tier_limit_form),
    ("GET", ORG + "/members", members),
    ("GET", ORG + "/alerts", alerts),
    ("GET", ORG + "/statements", statements),
    ("GET", ORG + "/statements/{month}.csv", statement_csv),
    ("POST", ORG + "/extra-usage", set_extra_usage),
    ("POST", ORG + "/spend-limit", set_spend_limit),
    ("POST", ORG + "/tiers/{tier}/limit", set_seat_tier_limit),
    ("POST", ORG + "/auto-reload", set_auto_reload),
    ("POST", ORG + "/credits", buy),
)


def setup(app: web.Application) -> None:
    """The pages, their templates and static files (served from the package: no network)."""
    app[SESSIONS] = Sessions(app[CLOCK])
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("proxy", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters={"usd": _usd_filter, "tier_name": str.capitalize, "share": _share_filter},
    )
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_get("/ui", _to_home)
    app.router.add_static("/ui/static", STATIC_DIR)


async def _to_home(request: web.Request) -> web.Response:
    return redirect("/ui/")


def _share_filter(usd: str, pct: int) -> str:
    """`pct` percent of a USD string, for a meter's low / high marks: "5" | share(90) -> "4.5"."""
    return format_usd(usd_to_nanos(usd) * pct // 100)


def _usd_filter(value: str | None) -> str:
    """A USD string of the API as people read it: "$12.5", "Unlimited", "—" for none."""
    if value is None:
        return "—"
    if value == UNLIMITED:
        return "Unlimited"
    return f"${value}"
