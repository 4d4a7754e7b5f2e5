"""The limit-reached response (SPEC §7): what ran out, when it resets, and how to continue."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from proxy.errors import Refusal
from proxy.ledger import (
    BALANCE,
    MEMBER_MONTHLY,
    ORG_MONTHLY,
    SESSION,
    TIER_MONTHLY,
    Blocked,
    ExtraFunds,
    Unaffordable,
    Window,
    month_end_s,
)
from proxy.money import format_usd
from proxy.store.base import Seat

CONTINUE_HEADER = "x-extra-usage: continue"
CONTINUE_ENDPOINT = "POST /v1/extra-usage/continue"
CLAIMS = {SESSION: "five_hour", "weekly": "seven_day"}


def rfc3339(at_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at_s))


def reset_phrase(at_s: float, timezone: str) -> str:
    """'18:00 UTC on 23 Nov' or '19:00 Europe/Rome (18:00 UTC) on 23 Nov'."""
    utc = datetime.fromtimestamp(at_s, UTC)
    day = f"{utc.day} {utc:%b}"
    if timezone == "UTC":
        return f"{utc:%H:%M} UTC on {day}"
    local = utc.astimezone(ZoneInfo(timezone))
    return f"{local:%H:%M} {timezone} ({utc:%H:%M} UTC) on {local.day} {local:%b}"


def limit_refusal(
    blocked: Blocked, *, seat: Seat, now_s: float, continue_url: str | None
) -> Refusal:
    """The 429 that Claude Code shows at once (x-should-retry: false) and people can act on."""
    w = blocked.window
    what = "session" if w.kind == SESSION else "weekly"
    hours = round((w.ends_at_s - w.started_at_s) / 3600)
    span = f"{hours}-hour" if w.kind == SESSION else "weekly"
    resets = reset_phrase(w.ends_at_s, seat.timezone)
    details: dict[str, object] = {
        "limit": blocked.limit,
        "resets_at": rfc3339(w.ends_at_s),
        "used_usd": format_usd(w.used_nanos),
        "limit_usd": format_usd(w.limit_nanos),
        "extra_usage": blocked.extra_usage,
    }
    if blocked.limit == "extra_usage_disabled":
        refusal = extra_usage_disabled_refusal(seat, f"past your {what} limit")
        refusal.message += f" Or wait: your {what} allowance resets at {resets}."
        assert refusal.details is not None
        refusal.details.update(details, limit="extra_usage_disabled")
        return refusal

    head = (
        f"You've used the ${format_usd(w.limit_nanos)} included in your {span} "
        f"{'window' if w.kind == SESSION else 'allowance'}; it resets at {resets}."
    )
    if blocked.extra_usage == "available" and continue_url is not None:
        message = (
            f"{head} To keep working now on extra usage at API rates, open {continue_url} "
            "(or run: usage-proxy continue)."
        )
        details["continue"] = {
            "url": continue_url,
            "header": CONTINUE_HEADER,
            "endpoint": CONTINUE_ENDPOINT,
        }
    else:
        message = f"{head} Extra usage is off for you: ask an owner of {seat.org_id} to enable it."
    retry_after_s = max(1, math.ceil(w.ends_at_s - now_s))
    headers = {
        "x-should-retry": "false",
        "retry-after": str(retry_after_s),
        "anthropic-ratelimit-unified-status": "rejected",
        "anthropic-ratelimit-unified-reset": str(math.ceil(w.ends_at_s)),
        "anthropic-ratelimit-unified-representative-claim": CLAIMS[w.kind],
    }
    return Refusal(
        429,
        "rate_limit_error",
        message,
        outcome=f"refused_{w.kind}",
        headers=headers,
        details=details,
    )


def extra_usage_disabled_refusal(seat: Seat, where: str = "on extra usage") -> Refusal:
    """The member asked to continue, but extra usage is off for them."""
    message = (
        f"Extra usage is off for you, so you cannot continue {where}. "
        f"Ask an owner of {seat.org_id} to enable extra usage for you."
    )
    details = {
        "limit": "extra_usage_disabled",
        "extra_usage": "disabled",
        "error_code": "credits_required",
    }
    return Refusal(
        429,
        "billing_error",
        message,
        outcome="refused_extra_usage_disabled",
        headers={"x-should-retry": "false"},
        details=details,
    )


def window_headers(window: Window | None, kind: str) -> dict[str, str]:
    if window is None:
        return {}
    return {
        f"x-usage-{kind}-limit": format_usd(window.limit_nanos),
        f"x-usage-{kind}-remaining": format_usd(window.remaining_nanos),
        f"x-usage-{kind}-reset": rfc3339(window.ends_at_s),
    }


MONEY_NAMES = {
    ORG_MONTHLY: "your organisation's monthly spend limit for extra usage",
    TIER_MONTHLY: "the monthly extra-usage limit of your seat tier",
    MEMBER_MONTHLY: "your monthly extra-usage limit",
}


def money_refusal(refused: Unaffordable, *, seat: Seat, funds: ExtraFunds) -> Refusal:
    """Extra usage would pay, but a limit or the prepaid balance cannot fit the worst case."""
    account = refused.account
    left = format_usd(account.headroom_nanos or 0)
    could = format_usd(refused.worst_case_nanos)
    details: dict[str, object] = {
        "limit": account.name,
        "used_usd": format_usd(account.used_nanos + account.reserved_nanos),
        "limit_usd": format_usd(account.limit_nanos or 0),
        "remaining_usd": left,
        "request_max_usd": could,
        "error_code": "credits_required",
    }
    if account.name == BALANCE:
        message = (
            f"The prepaid extra-usage funds of {seat.org_id} have ${left} left and this request "
            f"could cost up to ${could}. Ask an owner to buy more or turn on auto-reload, or "
            "lower max_tokens."
        )
    else:
        resets_at_s = month_end_s(funds.month, funds.timezone)
        details["resets_at"] = rfc3339(resets_at_s)
        message = (
            f"{MONEY_NAMES[account.name].capitalize()} has ${left} left and this request could "
            f"cost up to ${could}. It resets at {reset_phrase(resets_at_s, funds.timezone)}; "
            f"ask an owner of {seat.org_id} to raise it, or lower max_tokens."
        )
    return Refusal(
        429,
        "billing_error",
        message,
        outcome=f"refused_{account.name}",
        headers={"x-should-retry": "false"},
        details=details,
    )
