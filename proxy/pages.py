"""The continue page: the link in the limit-reached message opens it; works without JavaScript."""

from __future__ import annotations

from html import escape

from aiohttp import web

from proxy.appkeys import BILLING, CLOCK, SETTINGS
from proxy.continuation import InvalidLink
from proxy.money import format_usd
from proxy.refusals import reset_phrase

EXAMPLE_MODEL = "claude-opus-4-8"


async def continue_page(request: web.Request) -> web.Response:
    """GET: what continuing means and costs, and one button."""
    app = request.app
    token = request.match_info["token"]
    try:
        member_id = app[BILLING].links.member_id(token, app[CLOCK].now_s())
    except InvalidLink as exc:
        return _page("Link not valid", f"<p>{escape(str(exc))}</p>", status=410)
    status = await app[BILLING].status(member_id)
    if not status.member.extra_usage_enabled:
        return _page(
            "Extra usage is off",
            "<p>Extra usage is not enabled for you. Ask an owner "
            "of your organisation to enable it.</p>",
            status=403,
        )
    price = app[SETTINGS].prices.lookup(EXAMPLE_MODEL)
    rates = ""
    if price is not None:
        per_mtok = 1_000_000
        rates = (
            f" For example, {EXAMPLE_MODEL} costs "
            f"${format_usd(price.standard.input_nanos * per_mtok)} per million input tokens "
            f"and ${format_usd(price.standard.output_nanos * per_mtok)} per million output "
            "tokens."
        )
    body = (
        "<p>You have used the usage included with your seat. If you continue, further requests "
        f"are billed as <strong>extra usage at standard API prices</strong>.{escape(rates)}</p>"
        "<p>Your choice lasts until the window that ran out resets; after that, requests use "
        "your included usage again.</p>"
        f'<form method="post" action="/continue/{escape(token)}">'
        '<button type="submit">Continue with extra usage</button></form>'
    )
    return _page("Continue with extra usage", body)


async def confirm_continue(request: web.Request) -> web.Response:
    """POST: record the choice (the token is the credential: one member, until the reset)."""
    app = request.app
    try:
        member_id = app[BILLING].links.member_id(request.match_info["token"], app[CLOCK].now_s())
    except InvalidLink as exc:
        return _page("Link not valid", f"<p>{escape(str(exc))}</p>", status=410)
    status = await app[BILLING].continue_extra_usage(member_id)
    if not status.member.extra_usage_enabled or status.member.consent_until_s is None:
        return _page(
            "Extra usage is off",
            "<p>Extra usage is not enabled for you. Ask an owner "
            "of your organisation to enable it.</p>",
            status=403,
        )
    until = reset_phrase(status.member.consent_until_s, "UTC")
    return _page(
        "You're continuing with extra usage",
        f"<p>Extra usage is on for you until {escape(until)}. Go back to Claude Code "
        "and send your request again.</p>",
    )


def _page(title: str, body: str, *, status: int = 200) -> web.Response:
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · usage-proxy</title>"
        "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:3rem auto;"
        "padding:0 1rem;color:#1a1a1a}button{font:inherit;padding:.6rem 1.2rem;border:0;"
        "border-radius:.4rem;background:#1f4fd1;color:#fff;cursor:pointer}"
        "button:focus{outline:3px solid #f5a623}</style></head>"
        f"<body><main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )
    return web.Response(
        status=status,
        text=html,
        content_type="text/html",
        headers={"cache-control": "no-store", "referrer-policy": "no-referrer"},
    )
