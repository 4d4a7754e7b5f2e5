"""Admin reports of an organisation: usage (by member, model or day), alerts, monthly statements.

Days and months are the org's: a usage report's `from`..`to` are local dates in the org's time
zone, and a request counts on the local date of the instant it was admitted (DST included)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from proxy.admin.access import org_of
from proxy.appkeys import CLOCK, STORE
from proxy.errors import bad_request
from proxy.ledger import PREPAID_PLANS
from proxy.money import format_usd
from proxy.store.base import OrgView, Statement, UsageRow

GROUPS = ("member", "model", "day")
USAGE_QUERY = ("from", "to", "group_by")
STATEMENT_QUERY = ("format",)
# Posted requests are summed in SQL per slice of this many seconds, then the slices are put on
# local dates here: exact whenever every UTC offset of the zone is a multiple of it (all current
# zones are on a 15-minute grid); otherwise slices of one second are used.
SLICE_S = 900
CREDIT_KINDS = ("purchase", "reload")  # always listed; "adjustment" only when there is one
CSV_HEADER = ("line", "member", "model", "amount_usd")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


def query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once and among `allowed`; problems name them."""
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            listed = ", ".join(allowed) if allowed else "none"
            raise bad_request(f"{name}: unknown query parameter (allowed: {listed})")
        if name in values:
            raise bad_request(f"{name}: given more than once")
        values[name] = value
    return values


def parse_date(name: str, value: str) -> date:
    if not _DATE.fullmatch(value):
        raise bad_request(f"{name}: must be a date as YYYY-MM-DD, not {value!r}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise bad_request(f"{name}: no such date {value!r}") from None


def local_midnight_s(day: date, zone: ZoneInfo) -> float:
    """The instant a local date begins (a midnight skipped by DST: the instant it skips to)."""
    return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


def slice_s(first: date, last: date, zone: ZoneInfo) -> int:
    """The longest slice (up to SLICE_S) that never straddles a local midnight of the range."""
    days = (first + timedelta(days=n) for n in range(-1, (last - first).days + 2))
    noons = (datetime(d.year, d.month, d.day, 12, tzinfo=zone) for d in days)
    offsets = {int(noon.utcoffset().total_seconds()) for noon in noons}  # type: ignore[union-attr]
    return SLICE_S if all(offset % SLICE_S == 0 for offset in offsets) else 1


@dataclass(slots=True)
class Sums:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    cost_nanos: int = 0
    included_nanos: int = 0
    extra_nanos: int = 0
    overrun_nanos: int = 0

    def add(self, row: UsageRow) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(row, f.name))

    def json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_write_5m_tokens": self.cache_write_5m_tokens,
            "cache_write_1h_tokens": self.cache_write_1h_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cost_usd": format_usd(self.cost_nanos),
            "included_usd": format_usd(self.included_nanos),
            "extra_usd": format_usd(self.extra_nanos),
            "overrun_usd": format_usd(self.overrun_nanos),
        }


def _grouped(
    rows: Iterable[UsageRow], key: Callable[[UsageRow], str]
) -> tuple[dict[str, Sums], Sums]:
    groups: dict[str, Sums] = {}
    totals = Sums()
    for row in rows:
        groups.setdefault(key(row), Sums()).add(row)
        totals.add(row)
    return dict(sorted(groups.items())), totals


async def get_usage(request: web.Request) -> web.Response:
    """Posted requests between two local dates (inclusive), summed per member, model or day."""
    org = await org_of(request)
    params = query(request, USAGE_QUERY)
    zone = ZoneInfo(org.timezone)
    today = month_to_date(org, request.app[CLOCK].now_s())[1]
    last = parse_date("to", params["to"]) if "to" in params else today
    first = parse_date("from", params["from"]) if "from" in params else last.replace(day=1)
    if first > last:
        raise bad_request(f"from: {first} is after to ({last})")
    group_by = params.get("group_by", "member")
    if group_by not in GROUPS:
        raise bad_request(f"group_by: must be one of {', '.join(GROUPS)}, not {group_by!r}")
    rows = await posted_usage(request.app, org, first, last, by_day=group_by == "day")
    if group_by == "member":
        groups, totals = _grouped(rows, lambda r: r.member)
    elif group_by == "model":
        groups, totals = _grouped(rows, lambda r: r.model)
    else:
        groups, totals = _grouped(rows, lambda r: local_date(r, zone).isoformat())
    return web.json_response(
        {
            "org": org.id,
            "timezone": org.timezone,
            "from": first.isoformat(),
            "to": last.isoformat(),
            "group_by": group_by,
            "rows": [{group_by: key, **sums.json()} for key, sums in groups.items()],
            "totals": totals.json(),
        }
    )


def month_to_date(org: OrgView, now_s: float) -> tuple[date, date]:
    """The first day of the org's current month and today, as local dates of its zone."""
    today = datetime.fromtimestamp(now_s, ZoneInfo(org.timezone)).date()
    return today.replace(day=1), today


async def posted_usage(
    app: web.Application, org: OrgView, first: date, last: date, *, by_day: bool
) -> list[UsageRow]:
    """Posted requests admitted on local dates first..last, per member and model (and per
    slice of a day, when `by_day`: put each row on its date with local_date)."""
    zone = ZoneInfo(org.timezone)
    return await app[STORE].usage_report(
        org.id,
        local_midnight_s(first, zone),
        local_midnight_s(last + timedelta(days=1), zone),
        slice_s(first, last, zone) if by_day else None,
    )


def local_date(row: UsageRow, zone: ZoneInfo) -> date:
    return datetime.fromtimestamp(row.slice_start_s, zone).date()


async def get_alerts(request: web.Request) -> web.Response:
    """Every alert the org has had, oldest first, as it was sent."""
    org = await org_of(request)
    query(request, ())
    return web.json_response({"alerts": await request.app[STORE].list_alerts(org.id)})


def statement_json(statement: Statement) -> dict[str, Any]:
    credits = {kind: statement.credits_nanos.get(kind, 0) for kind in CREDIT_KINDS}
    credits.update(statement.credits_nanos)
    return {
        "org": statement.org_id,
        "month": statement.month,
        "plan": statement.plan,
        "billing": "prepaid" if statement.plan in PREPAID_PLANS else "postpaid",
        "usage": [
            {"member": member, "model": model, "extra_usd": format_usd(nanos)}
            for (member, model), nanos in sorted(statement.usage_nanos.items())
        ],
        "credits": {kind: format_usd(nanos) for kind, nanos in credits.items()},
        "usage_total_usd": format_usd(statement.usage_total_nanos),
        "due_usd": format_usd(statement.due_nanos),
    }


def statement_csv(body: dict[str, Any]) -> str:
    """The statement as CSV rows of (line, member, model, amount_usd): one `usage` line per
    member and model, one line per kind of credit, then `usage_total` and `due`; amounts are
    the JSON's strings, so a reader gets the very same numbers."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for line in body["usage"]:
        writer.writerow(("usage", line["member"], line["model"], line["extra_usd"]))
    for kind, amount in body["credits"].items():
        writer.writerow((kind, "", "", amount))
    writer.writerow(("usage_total", "", "", body["usage_total_usd"]))
    writer.writerow(("due", "", "", body["due_usd"]))
    return out.getvalue()


async def get_statement(request: web.Request) -> web.Response:
    """A month of extra usage per member and model, credits bought, and what is due."""
    org = await org_of(request)
    month = request.match_info["month"]
    if not _MONTH.fullmatch(month):
        raise bad_request(f"month: must be YYYY-MM, not {month!r}")
    fmt = query(request, STATEMENT_QUERY).get("format", "json")
    if fmt not in ("json", "csv"):
        raise bad_request(f"format: must be json or csv, not {fmt!r}")
    body = await statement_of(request.app, org, month)
    if fmt == "json":
        return web.json_response(body)
    return statement_csv_response(org, month, body)


async def statement_of(app: web.Application, org: OrgView, month: str) -> dict[str, Any]:
    """The statement of a month (YYYY-MM), as the JSON answer."""
    if not _MONTH.fullmatch(month):
        raise bad_request(f"month: must be YYYY-MM, not {month!r}")
    return statement_json(await app[STORE].statement(org.id, month))


def statement_csv_response(org: OrgView, month: str, body: dict[str, Any]) -> web.Response:
    safe_org = re.sub(r"[^A-Za-z0-9._-]", "_", org.id)
    return web.Response(
        text=statement_csv(body),
        content_type="text/csv",
        charset="utf-8",
        headers={"content-disposition": f'attachment; filename="statement-{safe_org}-{month}.csv"'},
    )
