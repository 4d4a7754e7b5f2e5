"""The web pages over real sockets against create_app: sign-in and its cookie, CSRF, who may
see what (the admin API's rules), and every action seen through the admin API or /v1/usage."""

from __future__ import annotations

import re

import pytest
from structlog.testing import capture_logs

from tests.conftest import ADMIN_TOKEN, ALICE_KEY, BOB_KEY
from tests.test_e2e_sdk import PROMPT, sdk, settled
from tests.ui.conftest import DAVE_KEY, ERIN_KEY, api

OWNER_PAGES = ("", "/usage", "/members", "/alerts", "/statements", "/statements/2026-01.csv",
               "/usage/spend-limit")  # fmt: skip


async def org(server, org_id: str = "acme") -> dict:
    status, body = await api(server, "GET", f"/admin/v1/orgs/{org_id}")
    assert status == 200
    return body


async def html(client, path: str) -> str:
    status, text = await client.get(path)
    assert status == 200, (path, status)
    return text


async def member_usage(server, key: str) -> dict:
    status, body = await api(server, "GET", "/v1/usage", key)
    assert status == 200
    return body


# --- sign-in, cookie, logout -------------------------------------------------------------------


async def test_session_cookie_is_httponly_samesite_strict_and_new_on_sign_in(ui, web_client):
    client = await web_client()
    async with client.http.get(ui.make_url("/ui/login")) as r:
        assert r.status == 200
        form_cookie = r.headers["set-cookie"]
        assert "HttpOnly" in form_cookie
        assert "SameSite=Strict" in form_cookie
        assert "Path=/ui" in form_cookie
        client.csrf_token = re.search(r'name="csrf_token" value="([^"]+)"', await r.text())[1]
    anonymous = client.session_cookie()
    response = await client.post("/ui/login", {"key": ALICE_KEY})
    assert response.status == 303
    assert response.headers["location"] == "/ui/"
    signed_in = response.headers["set-cookie"]
    assert "HttpOnly" in signed_in and "SameSite=Strict" in signed_in
    assert client.session_cookie() not in (None, anonymous)  # never the form's session


@pytest.mark.parametrize(
    ("key", "home"),
    [(ALICE_KEY, "/ui/orgs/acme"), (BOB_KEY, "/ui/me"), (ADMIN_TOKEN, None)],
)
async def test_owners_members_and_the_operator_land_on_their_pages(web_client, key, home):
    client = await web_client(key)
    status, text = await client.get("/ui/")
    if home is None:  # the operator: every org, opened by id
        assert status == 200 and "Organisation id" in text
        status, _ = await client.get("/ui/orgs/globex")
        assert status == 200
    else:
        assert status == 303
        status, _ = await client.get(home)
        assert status == 200


async def test_a_wrong_key_or_a_missing_csrf_token_does_not_sign_in(web_client):
    client = await web_client()
    response = await client.sign_in("sk-not-a-key")
    assert response.status == 401
    status, text = await client.get("/ui/login")
    assert status == 200 and "not valid on this proxy" not in text  # still the form
    response = await client.post("/ui/login", {"key": ALICE_KEY}, csrf=False)
    assert response.status == 403
    status, _ = await client.get("/ui/orgs/acme")
    assert status == 303  # back to sign-in


async def test_pages_without_a_session_go_to_sign_in(ui, web_client):
    client = await web_client()
    for path in ("/ui/", "/ui/me", "/ui/orgs/acme", "/ui/orgs/acme/usage"):
        status, _ = await client.get(path)
        assert status == 303, path
    response = await client.post("/ui/orgs/acme/spend-limit", {"to": "unlimited"}, csrf=False)
    assert response.status == 401
    assert (await org(ui))["monthly_spend_limit_usd"] == "unlimited"


async def test_logout_ends_the_session_for_good(ui, web_client):
    client = await web_client(ALICE_KEY)
    await client.get("/ui/orgs/acme")
    old_cookie = client.session_cookie()
    response = await client.post("/ui/logout", {})
    assert response.status == 303 and response.headers["location"] == "/ui/login"
    status, _ = await client.get("/ui/orgs/acme")
    assert status == 303
    replay = await web_client()  # the old cookie, sent again by hand
    replay.http.cookie_jar.update_cookies({"usage_proxy_session": old_cookie}, ui.make_url("/ui/"))
    status, _ = await replay.get("/ui/orgs/acme")
    assert status == 303


async def test_a_revoked_key_ends_its_session_at_once(ui, web_client):
    client = await web_client(BOB_KEY)
    assert (await client.get("/ui/me"))[0] == 200
    status, _ = await api(ui, "DELETE", f"/admin/v1/keys/{BOB_KEY[:12]}")
    assert status == 200
    assert (await client.get("/ui/me"))[0] == 303


async def test_a_session_lasts_twelve_hours(ui, web_client, clock):
    client = await web_client(ALICE_KEY)
    clock.advance(12 * 3600 - 1)
    assert (await client.get("/ui/orgs/acme"))[0] == 200
    clock.advance(1)
    assert (await client.get("/ui/orgs/acme"))[0] == 303


async def test_sign_in_logs_who_but_never_the_key(web_client):
    with capture_logs() as logs:
        await web_client(ALICE_KEY)
        await web_client(ADMIN_TOKEN)
    assert any(line["event"] == "ui_signed_in" for line in logs)
    text = repr(logs)
    assert ALICE_KEY not in text and ADMIN_TOKEN not in text


# --- who may see and do what -------------------------------------------------------------------


@pytest.mark.parametrize("page", OWNER_PAGES)
async def test_a_member_gets_403_on_owner_pages(web_client, page):
    client = await web_client(BOB_KEY)
    status, text = await client.get(f"/ui/orgs/acme{page}")
    assert status == 403
    assert "Only owners and primary owners manage organisations." in text


@pytest.mark.parametrize("page", OWNER_PAGES)
async def test_an_owner_gets_403_on_another_orgs_pages(web_client, page):
    client = await web_client(ALICE_KEY)
    assert (await client.get(f"/ui/orgs/acme{page}"))[0] == 200
    assert (await client.get(f"/ui/orgs/globex{page}"))[0] == 403


ACTIONS = [
    ("/extra-usage", {"extra_usage": "all"}),
    ("/spend-limit", {"to": "amount", "amount_usd": "5"}),
    ("/auto-reload", {"to": "on", "threshold_usd": "1", "amount_usd": "5"}),
    ("/credits", {"amount_usd": "5", "idempotency_key": "k1"}),
]


@pytest.mark.parametrize(("path", "form"), ACTIONS)
async def test_a_member_cannot_act_as_an_owner(ui, web_client, path, form):
    before = await org(ui)
    client = await web_client(BOB_KEY)
    await client.get("/ui/me")  # a page with the member's own CSRF token
    response = await client.post(f"/ui/orgs/acme{path}", form)
    assert response.status == 403
    assert await org(ui) == before


@pytest.mark.parametrize(("path", "form"), ACTIONS)
async def test_a_form_without_its_csrf_token_is_refused(ui, web_client, path, form):
    before = await org(ui)
    client = await web_client(ALICE_KEY)
    await client.get("/ui/orgs/acme/usage")
    response = await client.post(f"/ui/orgs/acme{path}", form, csrf=False)
    assert response.status == 403
    response = await client.post(
        f"/ui/orgs/acme{path}", [*form.items(), ("csrf_token", "forged")], csrf=False
    )
    assert response.status == 403
    assert await org(ui) == before


async def test_another_sessions_csrf_token_is_refused(ui, web_client):
    mallory = await web_client(ALICE_KEY)
    await mallory.get("/ui/orgs/acme/usage")
    victim = await web_client(ALICE_KEY)
    await victim.get("/ui/orgs/acme/usage")
    assert mallory.csrf_token != victim.csrf_token
    victim.csrf_token = mallory.csrf_token
    response = await victim.post("/ui/orgs/acme/extra-usage", {"extra_usage": "all"})
    assert response.status == 403
    assert (await org(ui))["extra_usage"] == "off"


# --- owners' actions, seen through the admin API and /v1/usage --------------------------------


async def owner(web_client, key: str = ALICE_KEY, org_id: str = "acme"):
    client = await web_client(key)
    status, _ = await client.get(f"/ui/orgs/{org_id}/usage")
    assert status == 200
    return client


async def test_enable_and_disable_extra_usage(ui, web_client):
    client = await owner(web_client)
    assert (await member_usage(ui, BOB_KEY))["extra_usage"]["status"] == "off"
    response = await client.post("/ui/orgs/acme/extra-usage", {"extra_usage": "all"})
    assert response.status == 303
    assert (await org(ui))["extra_usage"] == "all"
    assert (await member_usage(ui, BOB_KEY))["extra_usage"]["status"] == "available"
    text = await html(client, "/ui/orgs/acme/usage")
    assert "Extra usage is on for the whole organisation." in text  # the notice, once
    assert ">Disable</button>" in text
    await client.post("/ui/orgs/acme/extra-usage", {"extra_usage": "off"})
    assert (await org(ui))["extra_usage"] == "off"
    assert (await member_usage(ui, BOB_KEY))["extra_usage"]["status"] == "off"


async def test_extra_usage_for_selected_members(ui, web_client):
    client = await owner(web_client)
    await client.post(
        "/ui/orgs/acme/extra-usage", [("extra_usage", "selected"), ("member", "bob@acme.test")]
    )
    assert (await org(ui))["extra_usage"] == ["bob@acme.test"]
    assert (await member_usage(ui, BOB_KEY))["extra_usage"]["status"] == "available"
    assert (await member_usage(ui, ALICE_KEY))["extra_usage"]["status"] == "off"
    response = await client.post(
        "/ui/orgs/acme/extra-usage", [("extra_usage", "selected"), ("member", "eve@acme.test")]
    )
    assert response.status == 400  # the admin API's own check
    assert (await org(ui))["extra_usage"] == ["bob@acme.test"]


async def test_set_limit_and_set_to_unlimited(ui, web_client):
    client = await owner(web_client)
    response = await client.post(
        "/ui/orgs/acme/spend-limit", {"to": "amount", "amount_usd": "$42.5"}
    )
    assert response.status == 303
    assert (await org(ui))["monthly_spend_limit_usd"] == "42.5"
    assert (await member_usage(ui, BOB_KEY))["extra_usage"]["org_limit_usd"] == "42.5"
    text = await html(client, "/ui/orgs/acme/usage")
    assert '<strong data-testid="spend-limit">$42.5</strong>' in text
    await client.post("/ui/orgs/acme/spend-limit", {"to": "unlimited", "amount_usd": ""})
    assert (await org(ui))["monthly_spend_limit_usd"] == "unlimited"
    text = await html(client, "/ui/orgs/acme/usage")
    assert '<strong data-testid="spend-limit">Unlimited</strong>' in text


@pytest.mark.parametrize(
    ("amount", "message"),
    [("-5", "monthly_spend_limit_usd: must be 0 or more"), ("lots", "not an amount")],
)
async def test_a_bad_amount_is_refused_with_the_admin_apis_message(ui, web_client, amount, message):
    client = await owner(web_client)
    response = await client.post(
        "/ui/orgs/acme/spend-limit", {"to": "amount", "amount_usd": amount}
    )
    assert response.status == 400
    assert (await org(ui))["monthly_spend_limit_usd"] == "unlimited"
    async with client.http.post(
        client.server.make_url("/ui/orgs/acme/spend-limit"),
        data={"to": "amount", "amount_usd": amount, "csrf_token": client.csrf_token},
    ) as r:
        assert r.status == 400
        assert message in await r.text()  # the refusal page says what was wrong


async def test_tier_limits_on_enterprise(ui, web_client):
    client = await owner(web_client, DAVE_KEY, "globex")
    status, text = await client.get("/ui/orgs/globex/usage")
    assert 'aria-label="Edit Standard limit"' in text and 'aria-label="Edit Premium limit"' in text
    response = await client.post(
        "/ui/orgs/globex/tiers/standard/limit", {"to": "amount", "amount_usd": "30"}
    )
    assert response.status == 303
    assert (await org(ui, "globex"))["tier_limits_usd"]["standard"] == "30"
    assert (await member_usage(ui, ERIN_KEY))["extra_usage"]["member_limit_usd"] == "30"
    await client.post("/ui/orgs/globex/tiers/standard/limit", {"to": "unlimited"})
    assert (await org(ui, "globex"))["tier_limits_usd"]["standard"] == "unlimited"
    assert (await member_usage(ui, ERIN_KEY))["extra_usage"]["member_limit_usd"] == "unlimited"
    status, _ = await client.get("/ui/orgs/globex/usage/tiers/premium")  # the no-JS form
    assert status == 200


async def test_tier_limits_are_enterprise_only(ui, web_client):
    client = await owner(web_client)
    text = await html(client, "/ui/orgs/acme/usage")
    assert "Edit Standard limit" not in text
    response = await client.post(
        "/ui/orgs/acme/tiers/standard/limit", {"to": "amount", "amount_usd": "30"}
    )
    assert response.status == 400
    assert (await org(ui))["tier_limits_usd"] == {}


async def test_auto_reload_on_and_off(ui, web_client):
    client = await owner(web_client)
    await client.post(
        "/ui/orgs/acme/auto-reload", {"to": "on", "threshold_usd": "2", "amount_usd": "20"}
    )
    assert (await org(ui))["auto_reload"] == {"threshold_usd": "2", "amount_usd": "20"}
    await client.post("/ui/orgs/acme/auto-reload", {"to": "off"})
    assert (await org(ui))["auto_reload"] is None


async def test_auto_reload_and_credits_are_for_prepaid_plans(ui, web_client):
    client = await owner(web_client, DAVE_KEY, "globex")
    text = await html(client, "/ui/orgs/globex/usage")
    assert "Reload when balance reaches" not in text and "Buy credits" not in text
    response = await client.post(
        "/ui/orgs/globex/credits", {"amount_usd": "5", "idempotency_key": "x"}
    )
    assert response.status == 400


async def test_buying_credits_once_per_form(ui, web_client):
    client = await owner(web_client)
    text = await html(client, "/ui/orgs/acme/usage")
    key = re.search(r'name="idempotency_key" value="([^"]+)"', text)[1]
    form = {"amount_usd": "15", "idempotency_key": key}
    assert (await client.post("/ui/orgs/acme/credits", form)).status == 303
    assert (await org(ui))["balance_usd"] == "25"
    assert (await client.post("/ui/orgs/acme/credits", form)).status == 303  # sent twice
    assert (await org(ui))["balance_usd"] == "25"
    text = await html(client, "/ui/orgs/acme/usage")
    assert "already made" in text


# --- reports ----------------------------------------------------------------------------------


async def spend(server, key: str, count: int = 1) -> None:
    for _ in range(count):
        await sdk(server, key, **{"x-mock-output-tokens": "200"}).messages.create(
            model="claude-sonnet-4-5", max_tokens=200, messages=PROMPT
        )
        await settled(server)


async def test_members_table(ui, web_client):
    await spend(ui, BOB_KEY)
    client = await owner(web_client)
    status, text = await client.get("/ui/orgs/acme/members")
    assert status == 200
    used = (await member_usage(ui, BOB_KEY))["session"]["used_usd"]
    row = re.search(r"<th scope=\"row\">bob@acme.test</th>(.*?)</tr>", text, re.S)[1]
    assert f"${used} of $0.001" in row
    assert "Member" in row and "Standard" in row and "Off" in row


async def test_overview_charts_the_months_spend_by_member_and_model(ui, web_client):
    await spend(ui, BOB_KEY)
    await spend(ui, ALICE_KEY)
    client = await owner(web_client)
    status, text = await client.get("/ui/orgs/acme")
    assert status == 200
    _, report = await api(ui, "GET", "/admin/v1/orgs/acme/usage?group_by=member")
    for row in report["rows"]:
        assert f"{row['member']} · claude-sonnet-4-5" in text
        assert f'<td class="num">${row["cost_usd"]}</td>' in text
    assert text.count("<rect x=") == 2  # one bar of two segments: today
    assert "://" not in "".join(re.findall(r'(?:src|href)="([^"]*)"', text))  # nothing remote


async def test_statement_csv_is_the_admin_apis(ui, web_client):
    client = await owner(web_client)
    async with client.http.get(ui.make_url("/ui/orgs/acme/statements/2026-01.csv")) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        page_csv = await r.text()
    async with client.http.get(
        ui.make_url("/admin/v1/orgs/acme/statements/2026-01?format=csv"),
        headers={"authorization": f"Bearer {ALICE_KEY}"},
    ) as r:
        assert page_csv == await r.text()
    status, text = await client.get("/ui/orgs/acme/statements?month=2026-01")
    assert status == 200 and "Download CSV" in text
    status, _ = await client.get("/ui/orgs/acme/statements?month=2026-13")
    assert status == 400


# --- members' own page ------------------------------------------------------------------------


async def test_member_sees_bars_and_continues_when_blocked(ui, web_client):
    await api(ui, "PATCH", "/admin/v1/orgs/acme", body={"extra_usage": "all"})
    client = await web_client(BOB_KEY)
    text = await html(client, "/ui/me")
    assert "Session" in text and "Weekly" in text and "Starts with your next request." in text
    assert "Continue with extra usage" not in text
    await spend(ui, BOB_KEY)  # $0.003 of a $0.001 session
    text = await html(client, "/ui/me")
    assert "Resets at 05:00 UTC on 1 Jan." in text
    assert ">Continue with extra usage</button>" in text
    response = await client.post("/ui/me/continue", {})
    assert response.status == 303
    assert (await member_usage(ui, BOB_KEY))["extra_usage"]["status"] == "active"
    text = await html(client, "/ui/me")
    assert "Extra usage is on for you until 05:00 UTC on 1 Jan" in text  # the notice
    assert "Continue with extra usage</button>" not in text


async def test_member_with_extra_usage_off_is_told_to_ask_an_owner(ui, web_client):
    await spend(ui, BOB_KEY)
    client = await web_client(BOB_KEY)
    text = await html(client, "/ui/me")
    assert "Ask an owner" in text and "Continue with extra usage</button>" not in text
    response = await client.post("/ui/me/continue", {})
    assert response.status == 429  # the refusal of POST /v1/extra-usage/continue, as a page
    assert (await member_usage(ui, BOB_KEY))["extra_usage"]["status"] == "off"


async def test_the_operator_has_no_member_page(web_client):
    client = await web_client(ADMIN_TOKEN)
    assert (await client.get("/ui/me"))[0] == 404


async def test_pages_carry_strict_headers_and_local_assets(ui, web_client):
    client = await web_client(ALICE_KEY)
    async with client.http.get(ui.make_url("/ui/orgs/acme/usage")) as r:
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-frame-options"] == "DENY"
    for asset in ("/ui/static/ui.css", "/ui/static/ui.js"):
        async with client.http.get(ui.make_url(asset)) as r:
            assert r.status == 200, asset
