"""The admin API over real sockets: who may do what, what it changes, and bad input."""

from __future__ import annotations

import json

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ADMIN_TOKEN, ALICE_KEY, BOB_KEY
from tests.test_e2e_sdk import PROMPT, sdk

pytestmark = pytest.mark.both_stores  # every test here on both stores

CAROL_KEY = "sk-test-carol-0000000000000000004"
DAVE_KEY = "sk-test-dave-00000000000000000005"
ORGS = f"""
[[orgs]]
id = "acme"
plan = "team"
extra_usage = "all"
credits_usd = 1

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

[[orgs]]
id = "beta"
plan = "enterprise"

[[orgs.members]]
email = "dave@beta.test"
role = "owner"
tier = "standard"
key = "{DAVE_KEY}"
"""
TINY_PLANS = (
    "[tiers.standard]\nsession_included_usd = 0.000001\n[tiers.premium]\nsession_included_usd = 1\n"
)


@pytest.fixture
async def admin(start_proxy) -> TestServer:
    return await start_proxy(orgs=ORGS, plans=TINY_PLANS)


async def call(
    proxy: TestServer,
    method: str,
    path: str,
    key: str | None,
    body: object = None,
    raw: bytes | None = None,
) -> tuple[int, dict]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, proxy.make_url(path), data=data, headers=headers) as response,
    ):
        return response.status, await response.json()


CALLERS = {
    "operator": (ADMIN_TOKEN, True),
    "primary_owner": (CAROL_KEY, True),
    "owner": (ALICE_KEY, True),
    "member": (BOB_KEY, False),
    "other_org_owner": (DAVE_KEY, False),
    "no_key": (None, False),
}
ROUTES = [
    ("GET", "/admin/v1/orgs/acme", None),
    ("PATCH", "/admin/v1/orgs/acme", {"reservation": "worst_case"}),
    ("PUT", "/admin/v1/orgs/acme/tiers/standard/limit", {"monthly_spend_limit_usd": 5}),
    ("POST", "/admin/v1/orgs/acme/credits", {"amount_usd": 1, "idempotency_key": "matrix"}),
    ("POST", "/admin/v1/orgs/acme/members/bob@acme.test/keys", None),
    ("GET", "/admin/v1/orgs/acme/members/bob@acme.test/keys", None),
    ("POST", "/admin/v1/orgs/acme/members", {"email": "erin@acme.test"}),
    ("PATCH", "/admin/v1/orgs/acme/members/bob@acme.test", {"tier": "premium"}),
    ("DELETE", "/admin/v1/orgs/acme/members/bob@acme.test", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
@pytest.mark.parametrize("who", list(CALLERS))
async def test_authorisation_matrix(admin, who: str, method: str, path: str, body) -> None:
    key, allowed = CALLERS[who]
    status, answer = await call(admin, method, path, key, body)
    if allowed:
        assert status not in (401, 403), answer
    else:
        assert status == (401 if key is None else 403), answer
        assert answer["type"] == "error"


async def test_revoking_a_key_needs_its_own_org(admin) -> None:
    status, issued = await call(
        admin, "POST", "/admin/v1/orgs/beta/members/dave@beta.test/keys", DAVE_KEY
    )
    assert status == 201
    prefix = issued["prefix"]
    assert (await call(admin, "DELETE", f"/admin/v1/keys/{prefix}", ALICE_KEY))[0] == 403
    assert (await call(admin, "DELETE", f"/admin/v1/keys/{prefix}", BOB_KEY))[0] == 403
    assert (await call(admin, "DELETE", f"/admin/v1/keys/{prefix}", None))[0] == 401
    assert (await call(admin, "DELETE", f"/admin/v1/keys/{prefix}", DAVE_KEY))[0] == 200


async def test_an_issued_key_works_once_shown_and_stops_at_once_when_revoked(admin) -> None:
    status, issued = await call(
        admin, "POST", "/admin/v1/orgs/acme/members/bob@acme.test/keys", ALICE_KEY
    )
    assert status == 201 and issued["key"].startswith("sk-up-") and len(issued["key"]) > 40
    assert issued["key"].startswith(issued["prefix"])
    answer = await sdk(admin, issued["key"]).messages.create(
        model="claude-haiku-4-5", max_tokens=16, messages=PROMPT
    )
    assert answer.usage.output_tokens > 0
    longer = issued["key"][: len(issued["prefix"]) + 2]  # not the prefix: matched whole
    status, refused = await call(admin, "DELETE", f"/admin/v1/keys/{longer}", CAROL_KEY)
    assert status == 404 and "its first 12 characters" in refused["error"]["message"]
    assert (await call(admin, "DELETE", f"/admin/v1/keys/{issued['prefix']}", CAROL_KEY))[0] == 200
    with pytest.raises(anthropic.AuthenticationError):
        await sdk(admin, issued["key"]).messages.create(
            model="claude-haiku-4-5", max_tokens=16, messages=PROMPT
        )


async def test_credit_purchases_are_idempotent(admin) -> None:
    buy = {"amount_usd": "2.50", "idempotency_key": "order-7"}
    status, first = await call(admin, "POST", "/admin/v1/orgs/acme/credits", ALICE_KEY, buy)
    assert (status, first["balance_usd"], first["replayed"]) == (201, "3.5", False)
    status, again = await call(admin, "POST", "/admin/v1/orgs/acme/credits", ALICE_KEY, buy)
    assert (status, again["balance_usd"], again["replayed"]) == (200, "3.5", True)
    status, clash = await call(
        admin, "POST", "/admin/v1/orgs/acme/credits", ALICE_KEY, {**buy, "amount_usd": 3}
    )
    assert status == 409 and "idempotency_key" in clash["error"]["message"]
    status, _ = await call(admin, "POST", "/admin/v1/orgs/beta/credits", DAVE_KEY, buy)
    assert status == 400  # enterprise is postpaid


async def test_a_spend_limit_change_applies_to_the_next_request(admin) -> None:
    await sdk(admin).messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=PROMPT)
    status, org = await call(
        admin, "PATCH", "/admin/v1/orgs/acme", CAROL_KEY, {"monthly_spend_limit_usd": "0.0001"}
    )
    assert status == 200 and org["monthly_spend_limit_usd"] == "0.0001"
    with pytest.raises(anthropic.RateLimitError) as caught:
        await sdk(admin).messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=PROMPT)
    assert caught.value.response.json()["error"]["details"]["limit"] == "org_monthly"
    status, org = await call(
        admin, "PATCH", "/admin/v1/orgs/acme", CAROL_KEY, {"monthly_spend_limit_usd": "unlimited"}
    )
    assert org["monthly_spend_limit_usd"] == "unlimited"
    await sdk(admin).messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=PROMPT)


async def test_extra_usage_for_selected_members_and_off(admin) -> None:
    status, org = await call(
        admin, "PATCH", "/admin/v1/orgs/acme", ALICE_KEY, {"extra_usage": ["bob@acme.test"]}
    )
    assert status == 200 and org["extra_usage"] == ["bob@acme.test"]
    assert {m["email"]: m["extra_usage"] for m in org["members"]}["alice@acme.test"] is False
    status, org = await call(
        admin,
        "PATCH",
        "/admin/v1/orgs/acme",
        ALICE_KEY,
        {"extra_usage": "off", "auto_reload": {"threshold_usd": 1, "amount_usd": 5}},
    )
    assert org["extra_usage"] == "off"
    assert org["auto_reload"] == {"threshold_usd": "1", "amount_usd": "5"}


async def test_enterprise_tier_limit(admin) -> None:
    status, org = await call(
        admin,
        "PUT",
        "/admin/v1/orgs/beta/tiers/standard/limit",
        DAVE_KEY,
        {"monthly_spend_limit_usd": 50},
    )
    assert status == 200 and org["tier_limits_usd"] == {"standard": "50"}
    status, _ = await call(
        admin,
        "PUT",
        "/admin/v1/orgs/beta/tiers/gold/limit",
        DAVE_KEY,
        {"monthly_spend_limit_usd": 50},
    )
    assert status == 404


@pytest.mark.parametrize(
    ("body", "raw", "field"),
    [
        (None, b"{not json", "body"),
        ([1, 2], None, "body"),
        ({"colour": "red"}, None, "colour"),
        ({"monthly_spend_limit_usd": -5}, None, "monthly_spend_limit_usd"),
        ({"monthly_spend_limit_usd": True}, None, "monthly_spend_limit_usd"),
        ({"monthly_spend_limit_usd": "1e999"}, None, "monthly_spend_limit_usd"),
        ({"timezone": "Mars/Base"}, None, "timezone"),
        ({"extra_usage": ["nobody@acme.test"]}, None, "extra_usage"),
        ({"auto_reload": {"threshold_usd": 1}}, None, "auto_reload"),
        ({"webhook": {"url": "ftp://x", "secret_env": "S"}}, None, "webhook.url"),
        ({"reservation": 7}, None, "reservation"),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(admin, body, raw, field: str) -> None:
    status, answer = await call(admin, "PATCH", "/admin/v1/orgs/acme", ADMIN_TOKEN, body, raw)
    assert status == 400, answer
    assert answer["error"]["message"].startswith(f"{field}:")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount_usd": 0, "idempotency_key": "k"}, "amount_usd"),
        ({"amount_usd": "-1", "idempotency_key": "k"}, "amount_usd"),
        ({"amount_usd": 1}, "idempotency_key"),
        ({"amount_usd": 0.0000000001, "idempotency_key": "k"}, "amount_usd"),
    ],
)
async def test_bad_purchases_name_the_field(admin, body, field: str) -> None:
    status, answer = await call(admin, "POST", "/admin/v1/orgs/acme/credits", ADMIN_TOKEN, body)
    assert status == 400 and answer["error"]["message"].startswith(f"{field}:")


async def test_unknown_ids_are_404(admin) -> None:
    assert (await call(admin, "GET", "/admin/v1/orgs/nope", ADMIN_TOKEN))[0] == 404
    assert (await call(admin, "POST", "/admin/v1/orgs/acme/members/x@y/keys", ADMIN_TOKEN))[
        0
    ] == 404
    assert (await call(admin, "DELETE", "/admin/v1/keys/sk-nothing", ADMIN_TOKEN))[0] == 404


async def test_openapi_document_lists_every_admin_route(admin) -> None:
    status, doc = await call(admin, "GET", "/admin/v1/openapi.json", None)
    assert status == 200 and doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    registered = {
        (r.method, r.resource.canonical)
        for r in admin.app.router.routes()
        if r.resource is not None
        and r.resource.canonical.startswith("/admin/v1/")
        and r.method != "HEAD"
        and r.resource.canonical != "/admin/v1/openapi.json"
        and r.resource.canonical != "/admin/v1/clock"
    }
    assert registered == documented


@pytest.mark.parametrize("who", list(CALLERS))
async def test_only_the_operator_creates_orgs(admin, who: str) -> None:
    key, _ = CALLERS[who]
    status, answer = await call(
        admin,
        "POST",
        "/admin/v1/orgs",
        key,
        {"id": "gamma", "plan": "max", "timezone": "Europe/Rome"},
    )
    expected = {"operator": 201, "no_key": 401}.get(who, 403)
    assert status == expected, answer
    if who == "operator":
        assert answer["plan"] == "max" and answer["timezone"] == "Europe/Rome"
        assert answer["extra_usage"] == "off" and answer["balance_usd"] == "0"
        status, again = await call(
            admin, "POST", "/admin/v1/orgs", key, {"id": "gamma", "plan": "max"}
        )
        assert status == 409 and again["error"]["message"].startswith("id:")


async def test_a_new_member_gets_a_key_once_and_removal_revokes_it(admin) -> None:
    status, made = await call(
        admin,
        "POST",
        "/admin/v1/orgs/acme/members",
        ALICE_KEY,
        {"email": "erin@acme.test", "tier": "premium", "extra_usage_consent": "always"},
    )
    assert status == 201
    assert made["member"] == {
        "email": "erin@acme.test",
        "role": "member",
        "tier": "premium",
        "extra_usage": True,
        "monthly_spend_limit_usd": None,
        "extra_usage_consent": "always",
    }
    key = made["key"]
    answer = await sdk(admin, key).messages.create(
        model="claude-haiku-4-5", max_tokens=16, messages=PROMPT
    )
    assert answer.usage.output_tokens > 0
    status, _ = await call(
        admin, "POST", "/admin/v1/orgs/acme/members", ALICE_KEY, {"email": "erin@acme.test"}
    )
    assert status == 409
    assert (await call(admin, "DELETE", "/admin/v1/orgs/acme/members/erin@acme.test", ALICE_KEY))[
        0
    ] == 200
    with pytest.raises(anthropic.AuthenticationError):
        await sdk(admin, key).messages.create(
            model="claude-haiku-4-5", max_tokens=16, messages=PROMPT
        )
    status, org = await call(admin, "GET", "/admin/v1/orgs/acme", ALICE_KEY)
    assert "erin@acme.test" not in [m["email"] for m in org["members"]]


async def test_owners_cannot_touch_the_primary_owner(admin) -> None:
    carol = "/admin/v1/orgs/acme/members/carol@acme.test"
    assert (await call(admin, "PATCH", carol, ALICE_KEY, {"role": "member"}))[0] == 403
    assert (await call(admin, "DELETE", carol, ALICE_KEY))[0] == 403
    assert (
        await call(
            admin,
            "PATCH",
            "/admin/v1/orgs/acme/members/bob@acme.test",
            ALICE_KEY,
            {"role": "primary_owner"},
        )
    )[0] == 403
    assert (
        await call(
            admin,
            "POST",
            "/admin/v1/orgs/acme/members",
            ALICE_KEY,
            {"email": "x@acme.test", "role": "primary_owner"},
        )
    )[0] == 403
    # the primary owner and the operator can
    status, changed = await call(
        admin, "PATCH", "/admin/v1/orgs/acme/members/alice@acme.test", CAROL_KEY, {"role": "member"}
    )
    assert status == 200 and changed["member"]["role"] == "member"
    # alice is a member now: her key no longer manages the org, at once
    assert (await call(admin, "GET", "/admin/v1/orgs/acme", ALICE_KEY))[0] == 403
    assert (await call(admin, "PATCH", carol, ADMIN_TOKEN, {"tier": "premium"}))[0] == 200


async def test_member_changes_take_effect_on_the_next_request(admin) -> None:
    status, changed = await call(
        admin, "PATCH", "/admin/v1/orgs/acme/members/bob@acme.test", ALICE_KEY, {"tier": "premium"}
    )
    assert status == 200 and changed["member"]["tier"] == "premium"
    raw = await sdk(admin, BOB_KEY).messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=16, messages=PROMPT
    )
    assert raw.headers["x-usage-session-limit"] == "1"  # the premium tier's allowance


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/admin/v1/orgs/acme/members", {"email": "not-an-email"}, "email"),
        ("POST", "/admin/v1/orgs/acme/members", {"email": "e@acme.test", "tier": "gold"}, "tier"),
        ("POST", "/admin/v1/orgs/acme/members", {"tier": "standard"}, "email"),
        (
            "POST",
            "/admin/v1/orgs/acme/members",
            {"email": "e@acme.test", "monthly_spend_limit_usd": 5},
            "monthly_spend_limit_usd",
        ),
        ("PATCH", "/admin/v1/orgs/acme/members/bob@acme.test", {"role": "boss"}, "role"),
        (
            "PATCH",
            "/admin/v1/orgs/acme/members/bob@acme.test",
            {"extra_usage": "yes"},
            "extra_usage",
        ),
        ("POST", "/admin/v1/orgs", {"id": "Bad Id!", "plan": "team"}, "id"),
        ("POST", "/admin/v1/orgs", {"id": "ok", "plan": "gold"}, "plan"),
    ],
)
async def test_bad_member_and_org_input_names_the_field(admin, method, path, body, field) -> None:
    status, answer = await call(admin, method, path, ADMIN_TOKEN, body)
    assert status == 400, answer
    assert answer["error"]["message"].startswith(f"{field}:")


async def test_deeply_nested_json_body_is_a_400(admin) -> None:
    status, answer = await call(
        admin, "PATCH", "/admin/v1/orgs/acme", ADMIN_TOKEN, raw=b"[" * 100_000 + b"]" * 100_000
    )
    assert status == 400 and answer["error"]["message"].startswith("body:")


async def test_keys_are_listed_by_prefix_only(admin) -> None:
    status, issued = await call(
        admin, "POST", "/admin/v1/orgs/acme/members/bob@acme.test/keys", ALICE_KEY
    )
    await call(admin, "DELETE", f"/admin/v1/keys/{issued['prefix']}", ALICE_KEY)
    status, listed = await call(
        admin, "GET", "/admin/v1/orgs/acme/members/bob@acme.test/keys", ALICE_KEY
    )
    assert status == 200
    assert [k["prefix"] for k in listed["keys"]] == [BOB_KEY[:12], issued["prefix"]]
    assert listed["keys"][0]["revoked_at"] is None and listed["keys"][1]["revoked_at"]
    assert issued["key"] not in json.dumps(listed) and BOB_KEY not in json.dumps(listed)


async def test_readyz_reports_the_store(aiohttp_server, config, upstream) -> None:
    from proxy.app import create_app
    from proxy.appkeys import STORE

    app = create_app(config.settings(upstream_url=str(upstream.make_url("")).rstrip("/")))
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/readyz")) as response:
            assert response.status == 200
        async with http.get(server.make_url("/healthz")) as response:
            assert response.status == 200
        await app[STORE].close()  # the store goes away
        async with http.get(server.make_url("/readyz")) as response:
            assert response.status == 503
        async with http.get(server.make_url("/healthz")) as response:
            assert response.status == 200  # the process itself is fine
