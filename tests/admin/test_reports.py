"""Admin reports over real sockets: usage by member, model and day, alerts, monthly statements.

The org's zone is New York: its days and months are not UTC's, and DST moves its midnights."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.admin.reports import SLICE_S, slice_s
from proxy.appkeys import STORE
from proxy.money import usd_to_nanos
from tests.admin.test_routes import CALLERS, CAROL_KEY, DAVE_KEY, call
from tests.conftest import ADMIN_TOKEN, ALICE_KEY, BOB_KEY, settled
from tests.test_e2e_sdk import PROMPT, SCRIPTED_USAGE, sdk

pytestmark = pytest.mark.both_stores  # every test here on both stores

ERIN_KEY = "sk-test-erin-00000000000000000006"
ORGS = f"""
[[orgs]]
id = "acme"
plan = "enterprise"
timezone = "America/New_York"
extra_usage = "all"

[[orgs.members]]
email = "carol@acme.test"
role = "primary_owner"
tier = "standard"
key = "{CAROL_KEY}"

[[orgs.members]]
email = "alice@acme.test"
role = "owner"
tier = "standard"
key = "{ALICE_KEY}"
extra_usage_consent = "always"

[[orgs.members]]
email = "bob@acme.test"
role = "member"
tier = "standard"
key = "{BOB_KEY}"
extra_usage_consent = "always"

[[orgs]]
id = "beta"
plan = "enterprise"

[[orgs.members]]
email = "dave@beta.test"
role = "owner"
tier = "standard"
key = "{DAVE_KEY}"

[[orgs]]
id = "shop"
plan = "team"
extra_usage = "all"
credits_usd = 1

[[orgs.members]]
email = "erin@shop.test"
role = "owner"
tier = "standard"
key = "{ERIN_KEY}"
extra_usage_consent = "always"
"""
# A session of $0.001: the first request of a window crosses it, the rest are extra usage.
TINY_PLANS = "[tiers.standard]\nsession_included_usd = 0.001\n"
SONNET, HAIKU = "claude-sonnet-4-5", "claude-haiku-4-5"
NEW_YORK = ZoneInfo("America/New_York")


def at(text: str) -> float:
    """An instant given in UTC as "2026-01-10T12:00"."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
async def reports(start_proxy, clock) -> TestServer:
    clock.set_s(at("2026-01-05T15:00"))  # 10:00 in New York
    return await start_proxy(orgs=ORGS, plans=TINY_PLANS)


async def send(proxy: TestServer, key: str, model: str, script: dict[str, str]) -> None:
    """One request whose usage the mock upstream reports as scripted; waits for settlement."""
    await sdk(proxy, key, **script).messages.create(model=model, max_tokens=256, messages=PROMPT)
    await settled(proxy)


def tokens(input_tokens: int, output_tokens: int) -> dict[str, str]:
    return {"x-mock-input-tokens": str(input_tokens), "x-mock-output-tokens": str(output_tokens)}


async def fetch(proxy: TestServer, path: str, key: str | None = CAROL_KEY, **params: str):
    """(status, headers, text) of a GET."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(proxy.make_url(path), params=params, headers=headers) as response,
    ):
        return response.status, response.headers, await response.text()


async def usage(proxy: TestServer, **params: str) -> dict:
    status, _, text = await fetch(proxy, "/admin/v1/orgs/acme/usage", **params)
    assert status == 200, text
    return _json(text)


# ---- usage reports ------------------------------------------------------------------------


async def test_usage_by_member_model_and_local_day(reports, clock) -> None:
    store = reports.app[STORE]
    clock.set_s(at("2026-01-10T12:00"))  # 07:00 on the 10th in New York
    await send(reports, ALICE_KEY, SONNET, SCRIPTED_USAGE)
    await send(reports, BOB_KEY, HAIKU, tokens(10, 20))
    clock.set_s(at("2026-01-11T02:00"))  # the 11th in UTC, still 21:00 on the 10th in New York
    await send(reports, ALICE_KEY, HAIKU, tokens(7, 3))
    clock.set_s(at("2026-01-11T14:00"))  # 09:00 on the 11th in New York
    await send(reports, BOB_KEY, SONNET, tokens(50, 40))
    records = await store.recent_requests(4)
    assert all(r.status == "posted" for r in records)
    cost = {r.request_id: r.cost_nanos for r in records}
    emails = {await store.member_id("acme", e): e for e in ("alice@acme.test", "bob@acme.test")}

    report = await usage(
        reports, **{"from": "2026-01-10", "to": "2026-01-11", "group_by": "member"}
    )
    assert (report["from"], report["to"], report["timezone"]) == (
        "2026-01-10",
        "2026-01-11",
        "America/New_York",
    )
    alice, bob = report["rows"]
    assert alice["member"] == "alice@acme.test" and bob["member"] == "bob@acme.test"
    assert _tokens(alice) == (2, 1007, 203, 300, 100, 5000)
    assert _tokens(bob) == (2, 60, 60, 0, 0, 0)
    for row in (alice, bob):
        mine = [r for r in records if emails[r.member_id] == row["member"]]
        assert _money(row) == _sums(mine)
    assert _tokens(report["totals"]) == (4, 1067, 263, 300, 100, 5000)
    assert _money(report["totals"]) == _sums(records)
    assert usd_to_nanos(report["totals"]["cost_usd"]) == sum(cost.values())

    by_model = await usage(
        reports, **{"from": "2026-01-10", "to": "2026-01-11", "group_by": "model"}
    )
    assert [(r["model"], *_tokens(r)) for r in by_model["rows"]] == [
        (HAIKU, 2, 17, 23, 0, 0, 0),
        (SONNET, 2, 1050, 240, 300, 100, 5000),
    ]
    assert by_model["totals"] == report["totals"]

    by_day = await usage(reports, **{"from": "2026-01-10", "to": "2026-01-11", "group_by": "day"})
    assert [(r["day"], *_tokens(r)) for r in by_day["rows"]] == [
        ("2026-01-10", 3, 1017, 223, 300, 100, 5000),
        ("2026-01-11", 1, 50, 40, 0, 0, 0),
    ]
    assert by_day["totals"] == report["totals"]

    # a range that ends on the 10th (New York) leaves out the request of the 11th
    first_day = await usage(
        reports, **{"from": "2026-01-10", "to": "2026-01-10", "group_by": "day"}
    )
    assert [r["day"] for r in first_day["rows"]] == ["2026-01-10"]
    assert first_day["totals"]["requests"] == 3
    assert (await usage(reports, to="2026-01-09"))["rows"] == []

    # no parameters: by member, this month to date in the org's zone
    default = await usage(reports)
    assert (default["from"], default["to"], default["group_by"]) == (
        "2026-01-01",
        "2026-01-11",
        "member",
    )
    assert default["totals"] == report["totals"]


async def test_days_follow_dst_in_the_org_zone(reports, clock) -> None:
    clock.set_s(at("2026-03-08T04:30"))  # 23:30 EST on 7 March
    await send(reports, ALICE_KEY, HAIKU, tokens(1, 1))
    clock.set_s(at("2026-03-09T04:30"))  # 00:30 EDT on 9 March (EST would say the 8th)
    await send(reports, ALICE_KEY, HAIKU, tokens(2, 2))
    by_day = await usage(reports, **{"from": "2026-03-07", "to": "2026-03-09", "group_by": "day"})
    assert [(r["day"], r["input_tokens"]) for r in by_day["rows"]] == [
        ("2026-03-07", 1),
        ("2026-03-09", 2),
    ]
    eighth = await usage(reports, **{"from": "2026-03-08", "to": "2026-03-08"})  # 23 hours
    assert eighth["rows"] == [] and eighth["totals"]["requests"] == 0
    assert eighth["totals"]["cost_usd"] == "0"
    ninth = await usage(reports, **{"from": "2026-03-09", "to": "2026-03-09", "group_by": "day"})
    assert [(r["day"], r["input_tokens"]) for r in ninth["rows"]] == [("2026-03-09", 2)]


def test_day_slices_never_straddle_a_local_midnight() -> None:
    assert slice_s(date(2026, 1, 1), date(2026, 12, 31), NEW_YORK) == SLICE_S
    assert slice_s(date(2026, 1, 1), date(2026, 1, 2), ZoneInfo("Asia/Kathmandu")) == SLICE_S
    # Liberia kept -0:44:30 until 1972: slices of a second there
    assert slice_s(date(1970, 1, 1), date(1970, 1, 2), ZoneInfo("Africa/Monrovia")) == 1


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"from": "2026-1-5"}, "from"),
        ({"from": "2026-02-30"}, "from"),
        ({"to": "20260105"}, "to"),
        ({"to": "yesterday"}, "to"),
        ({"from": "2026-01-06", "to": "2026-01-05"}, "from"),
        ({"group_by": "week"}, "group_by"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_usage_parameters_are_400_naming_the_parameter(reports, params, name) -> None:
    status, _, text = await fetch(reports, "/admin/v1/orgs/acme/usage", **params)
    assert status == 400, text
    assert _message(text).startswith(f"{name}:")


async def test_any_date_range(reports) -> None:
    status, _, text = await fetch(
        reports, "/admin/v1/orgs/acme/usage", **{"from": "2020-01-01", "to": "2029-12-31"}
    )
    assert status == 200, text


# ---- statements ---------------------------------------------------------------------------


async def test_statement_matches_the_ledger_and_its_csv(reports, clock) -> None:
    store = reports.app[STORE]
    for _ in range(3):  # three sessions in January (New York): the 5th, 10th, 15th
        for _ in range(2):  # the first of a window is included quota, the rest extra usage
            for key, model in ((ALICE_KEY, SONNET), (ALICE_KEY, HAIKU), (BOB_KEY, HAIKU)):
                await send(reports, key, model, tokens(100, 200))
            await send(reports, BOB_KEY, SONNET, SCRIPTED_USAGE)
        clock.advance(5 * 86400)
    clock.set_s(at("2026-02-01T05:00"))  # midnight of 1 February in New York
    for _ in range(2):
        await send(reports, ALICE_KEY, SONNET, tokens(100, 200))

    for month in ("2026-01", "2026-02"):
        ledger = await _ledger(reports, month)
        status, _, text = await fetch(reports, f"/admin/v1/orgs/acme/statements/{month}")
        assert status == 200, text
        statement = _json(text)
        assert (statement["org"], statement["month"], statement["plan"]) == (
            "acme",
            month,
            "enterprise",
        )
        assert statement["billing"] == "postpaid"
        usage_nanos = {
            (u["member"], u["model"]): usd_to_nanos(u["extra_usd"]) for u in statement["usage"]
        }
        assert usage_nanos == ledger and all(ledger.values())
        assert usd_to_nanos(statement["usage_total_usd"]) == sum(ledger.values())
        assert statement["due_usd"] == statement["usage_total_usd"]  # postpaid: the usage
        assert statement["credits"] == {"purchase": "0", "reload": "0"}

        status, headers, text = await fetch(
            reports, f"/admin/v1/orgs/acme/statements/{month}", format="csv"
        )
        assert status == 200 and headers["content-type"].startswith("text/csv")
        assert f'filename="statement-acme-{month}.csv"' in headers["content-disposition"]
        assert headers["content-disposition"].startswith("attachment")
        lines = list(csv.DictReader(io.StringIO(text)))
        assert [line["line"] for line in lines] == [
            *["usage"] * len(ledger),
            "purchase",
            "reload",
            "usage_total",
            "due",
        ]
        from_csv = {
            (line["member"], line["model"]): usd_to_nanos(line["amount_usd"])
            for line in lines
            if line["line"] == "usage"
        }
        assert from_csv == ledger
        single = {line["line"]: line["amount_usd"] for line in lines if line["line"] != "usage"}
        assert single == {
            "purchase": "0",
            "reload": "0",
            "usage_total": statement["usage_total_usd"],
            "due": statement["due_usd"],
        }
        assert sum(from_csv.values()) == usd_to_nanos(single["usage_total"])

    january = await store.statement("acme", "2026-01")
    assert set(january.usage_nanos) == {
        (email, model)
        for email in ("alice@acme.test", "bob@acme.test")
        for model in (SONNET, HAIKU)
    }
    status, _, text = await fetch(reports, "/admin/v1/orgs/acme/statements/2026-03")
    assert status == 200
    assert _json(text)["usage"] == [] and _json(text)["due_usd"] == "0"


async def test_prepaid_statement_bills_the_credits_bought(reports) -> None:
    status, _ = await call(
        reports,
        "POST",
        "/admin/v1/orgs/shop/credits",
        ERIN_KEY,
        {"amount_usd": "2.5", "idempotency_key": "order-1"},
    )
    assert status == 201
    for _ in range(2):
        await send(reports, ERIN_KEY, SONNET, tokens(100, 200))
    ledger = await _ledger(reports, "2026-01", "shop")
    status, _, text = await fetch(reports, "/admin/v1/orgs/shop/statements/2026-01", ERIN_KEY)
    statement = _json(text)
    assert status == 200 and statement["billing"] == "prepaid" and statement["plan"] == "team"
    assert statement["credits"] == {"purchase": "3.5", "reload": "0"}
    assert statement["due_usd"] == "3.5"
    assert usd_to_nanos(statement["usage_total_usd"]) == sum(ledger.values()) > 0
    status, _, text = await fetch(
        reports, "/admin/v1/orgs/shop/statements/2026-01", ERIN_KEY, format="csv"
    )
    lines = {row["line"]: row["amount_usd"] for row in csv.DictReader(io.StringIO(text))}
    assert (lines["purchase"], lines["due"]) == ("3.5", "3.5")


@pytest.mark.parametrize(
    ("month", "params", "name"),
    [
        ("2026-13", {}, "month"),
        ("2026-1", {}, "month"),
        ("january", {}, "month"),
        ("2026-01", {"format": "xml"}, "format"),
        ("2026-01", {"fromat": "csv"}, "fromat"),
    ],
)
async def test_bad_statement_parameters_are_400_naming_them(reports, month, params, name) -> None:
    status, _, text = await fetch(reports, f"/admin/v1/orgs/acme/statements/{month}", **params)
    assert status == 400, text
    assert _message(text).startswith(f"{name}:")


# ---- alerts -------------------------------------------------------------------------------


async def test_alerts_are_listed_as_stored(reports) -> None:
    await send(reports, ALICE_KEY, SONNET, tokens(100, 200))
    for _ in range(100):  # the charge crossed 50, 75, 90 and 100% of alice's session
        stored = await reports.app[STORE].list_alerts("acme")
        if len(stored) == 4:
            break
        await asyncio.sleep(0.02)
    status, _, text = await fetch(reports, "/admin/v1/orgs/acme/alerts")
    assert status == 200
    alerts = _json(text)["alerts"]
    assert alerts == stored
    assert [(a["kind"], a["member"], a["threshold_pct"]) for a in alerts] == [
        ("session", "alice@acme.test", pct) for pct in (50, 75, 90, 100)
    ]
    status, _, text = await fetch(reports, "/admin/v1/orgs/beta/alerts", DAVE_KEY)
    assert (status, _json(text)) == (200, {"alerts": []})


# ---- who may read them --------------------------------------------------------------------

REPORTS = [
    "/admin/v1/orgs/acme/usage",
    "/admin/v1/orgs/acme/usage?group_by=day",
    "/admin/v1/orgs/acme/alerts",
    "/admin/v1/orgs/acme/statements/2026-01",
    "/admin/v1/orgs/acme/statements/2026-01?format=csv",
]


@pytest.mark.parametrize("path", REPORTS)
@pytest.mark.parametrize("who", list(CALLERS))
async def test_authorisation_matrix(reports, who: str, path: str) -> None:
    key, allowed = CALLERS[who]
    status, _, text = await fetch(reports, path, key)
    if allowed:
        assert status == 200, text
    else:
        assert status == (401 if key is None else 403), text
        assert _json(text)["type"] == "error"


@pytest.mark.parametrize("tail", ["usage", "alerts", "statements/2026-01"])
async def test_unknown_org_is_404(reports, tail: str) -> None:
    status, _, text = await fetch(reports, f"/admin/v1/orgs/nope/{tail}", ADMIN_TOKEN)
    assert status == 404 and _message(text).startswith("org:")


async def test_openapi_documents_the_query_parameters(reports) -> None:
    status, doc = await call(reports, "GET", "/admin/v1/openapi.json", None)
    assert status == 200
    usage_op = doc["paths"]["/admin/v1/orgs/{org}/usage"]["get"]
    assert [(p["name"], p["in"]) for p in usage_op["parameters"]] == [
        ("org", "path"),
        ("from", "query"),
        ("to", "query"),
        ("group_by", "query"),
    ]
    statement_op = doc["paths"]["/admin/v1/orgs/{org}/statements/{month}"]["get"]
    assert ("format", "query") in [(p["name"], p["in"]) for p in statement_op["parameters"]]
    assert set(statement_op["responses"]["200"]["content"]) == {"application/json", "text/csv"}
    assert "/admin/v1/orgs/{org}/alerts" in doc["paths"]


# ---- helpers ------------------------------------------------------------------------------


def _tokens(row: dict) -> tuple[int, ...]:
    return (
        row["requests"],
        row["input_tokens"],
        row["output_tokens"],
        row["cache_write_5m_tokens"],
        row["cache_write_1h_tokens"],
        row["cache_read_tokens"],
    )


def _money(row: dict) -> tuple[int, ...]:
    amounts = tuple(
        usd_to_nanos(row[f"{name}_usd"]) for name in ("cost", "included", "extra", "overrun")
    )
    assert amounts[0] == sum(amounts[1:])
    return amounts


def _sums(records) -> tuple[int, ...]:
    return (
        sum(r.cost_nanos for r in records),
        sum(r.included_nanos for r in records),
        sum(r.extra_nanos for r in records),
        sum(r.overrun_nanos for r in records),
    )


async def _ledger(proxy: TestServer, month: str, org: str = "acme") -> dict[tuple[str, str], int]:
    """Extra usage per (member email, model) summed from the month's transfers."""
    store = proxy.app[STORE]
    org_view = await store.get_org(org)
    emails = {await store.member_id(org, m.email): m.email for m in org_view.members}
    spent: dict[tuple[str, str], int] = {}
    for t in await store.list_transfers(org, month):
        if t.kind in ("usage_extra", "estimate_overrun"):
            key = (emails[t.member_id], t.model)
            spent[key] = spent.get(key, 0) - t.amount_nanos
    return spent


def _json(text: str) -> dict:
    return json.loads(text)


def _message(text: str) -> str:
    return _json(text)["error"]["message"]
