"""Extra usage end to end, one scenario per plan, as the seed documents describe them.

The `start_proxy` fixture checks the ledger invariant (balances = sums of transfers) after each."""

from __future__ import annotations

import asyncio

import anthropic
import pytest
from aiohttp.test_utils import TestServer

from proxy.appkeys import STORE
from proxy.mock_upstream import MOCK_STATE_KEY
from proxy.money import format_usd
from tests.conftest import ALICE_KEY, BOB_KEY, quiet, settled
from tests.test_e2e_sdk import PROMPT, sdk

pytestmark = pytest.mark.both_stores  # every test here on both stores

# A session of $0.001: the first request of a window crosses it, the next one is refused.
TINY_PLANS = """
[tiers.standard]
session_included_usd = 0.001
[tiers.premium]
session_included_usd = 0.001
"""
# ~$0.003 a request: 200 output tokens of Sonnet 4.5 plus a few input tokens.
OUTPUT = {"x-mock-output-tokens": "200"}


def org(plan: str, settings: str, *, alice: str = "", bob: str = "") -> str:
    return f"""
[[orgs]]
id = "acme"
plan = "{plan}"
timezone = "Europe/Rome"
{settings}

[[orgs.members]]
email = "alice@acme.test"
role = "owner"
tier = "standard"
key = "{ALICE_KEY}"
extra_usage_consent = "always"
{alice}

[[orgs.members]]
email = "bob@acme.test"
role = "member"
tier = "premium"
key = "{BOB_KEY}"
extra_usage_consent = "always"
{bob}
"""


async def ask(proxy: TestServer, key: str = ALICE_KEY, **headers: str):
    """One request; the raw response, or the API error it raised."""
    try:
        return await sdk(proxy, key, **OUTPUT, **headers).messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=200, messages=PROMPT
        )
    except anthropic.APIStatusError as exc:
        return exc


async def until_refused(proxy: TestServer, key: str = ALICE_KEY, most: int = 40):
    """Spend until a request is refused; return the refusal and how many went through."""
    for count in range(most):
        answer = await ask(proxy, key)
        await quiet(proxy)  # the settlement and any auto-reload (off the request path) landed
        if isinstance(answer, anthropic.APIStatusError):
            return answer, count
    raise AssertionError("never refused")


async def transfers(proxy: TestServer, kind: str) -> list[int]:
    return [t.amount_nanos for t in await proxy.app[STORE].list_transfers("acme") if t.kind == kind]


async def spent_nanos(proxy: TestServer) -> int:
    return -sum(await transfers(proxy, "usage_extra")) - sum(
        await transfers(proxy, "estimate_overrun")
    )


async def test_team_prepaid_auto_reload_org_limit_and_selected_members(start_proxy):
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "team",
            """
extra_usage = ["alice@acme.test"]
monthly_spend_limit_usd = 0.03
credits_usd = 0.02
auto_reload = { threshold_usd = 0.01, amount_usd = 0.02 }
""",
        ),
    )
    # bob was not selected for extra usage: his window's refusal says to ask an owner
    await ask(proxy, BOB_KEY)
    await quiet(proxy)
    refusal = await ask(proxy, BOB_KEY)
    assert refusal.response.json()["error"]["details"]["extra_usage"] == "disabled"

    refusal, count = await until_refused(proxy)
    error = refusal.response.json()["error"]
    assert refusal.status_code == 429 and error["type"] == "billing_error"
    assert error["details"]["limit"] == "org_monthly"
    assert error["details"]["error_code"] == "credits_required"
    assert "left" in error["message"] and "could cost up to" in error["message"]
    assert "Europe/Rome" in error["message"]  # the month resets in the org's zone
    assert count > 5
    # the balance crossed $0.01 once: exactly one reload, and never beyond the $0.03 limit
    assert await transfers(proxy, "reload") == [20_000_000]
    assert await spent_nanos(proxy) <= 30_000_000


async def test_team_balance_runs_out_without_auto_reload(start_proxy):
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "team",
            """
extra_usage = "all"
credits_usd = 0.01
""",
        ),
    )
    refusal, _ = await until_refused(proxy)
    error = refusal.response.json()["error"]
    assert error["details"]["limit"] == "balance"
    assert "credit balance is too low" not in error["message"]
    assert await spent_nanos(proxy) <= 10_000_000


async def test_enterprise_postpaid_org_tier_and_member_limits_lowest_wins(start_proxy, clock):
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "enterprise",
            """
extra_usage = "all"
monthly_spend_limit_usd = 0.05
tier_limits_usd = { standard = 0.01, premium = 0.02 }
""",
            bob="monthly_spend_limit_usd = 0.015",
        ),
    )
    refusal, _ = await until_refused(proxy)  # alice: her tier's $0.01
    assert refusal.response.json()["error"]["details"]["limit"] == "tier_monthly"
    refusal, _ = await until_refused(proxy, BOB_KEY)  # bob: his own $0.015 beats premium's
    assert refusal.response.json()["error"]["details"]["limit"] == "member_monthly"
    assert await transfers(proxy, "purchase") == [] and await transfers(proxy, "reload") == []
    spent = await spent_nanos(proxy)
    assert spent <= 10_000_000 + 15_000_000
    # the month's statement: postpaid, so what is due is the extra usage, per member and model
    statement = await proxy.app[STORE].statement("acme", "2026-01")
    assert statement.due_nanos == statement.usage_total_nanos == spent
    assert set(statement.usage_nanos) == {
        ("alice@acme.test", "claude-sonnet-4-5"),
        ("bob@acme.test", "claude-sonnet-4-5"),
    }
    assert statement.credits_nanos == {}
    # a new month in the org's time zone: month-to-date limits start again at once
    clock.set_s(1_769_900_400.0)  # 2026-02-01T00:00:00+01:00 (Europe/Rome)
    assert not isinstance(await ask(proxy), anthropic.APIStatusError)


async def test_max_unlimited_spend_with_auto_reload_and_session_reset(start_proxy, clock):
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "max",
            """
extra_usage = "all"
monthly_spend_limit_usd = "unlimited"
credits_usd = 0.01
auto_reload = { threshold_usd = 0.005, amount_usd = 0.01 }
""",
        ),
    )
    for _ in range(12):  # ~$0.036 of extra usage: the balance is reloaded as it crosses
        answer = await ask(proxy)
        assert not isinstance(answer, anthropic.APIStatusError), answer
        await quiet(proxy)
    reloads = await transfers(proxy, "reload")
    assert len(reloads) >= 2 and set(reloads) == {10_000_000}
    assert answer.headers["x-usage-billing"] == "extra"
    clock.advance(5 * 3600)  # the session resets: included quota pays again
    fresh = await ask(proxy)
    assert fresh.headers["x-usage-billing"] == "included"


@pytest.mark.parametrize("plan", ["team", "max"])
async def test_org_limit_set_to_unlimited_shows_in_headers(start_proxy, plan: str):
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            plan,
            """
extra_usage = "all"
monthly_spend_limit_usd = "unlimited"
credits_usd = 1
""",
        ),
    )
    await ask(proxy)
    await quiet(proxy)  # its charge (after the answer) has crossed the session
    answer = await ask(proxy)
    assert answer.headers["x-usage-billing"] == "extra"
    assert answer.headers["x-usage-extra-remaining"] == "1"  # the balance is what limits it


class DecliningCard:
    """A payment provider whose card is declined: reloads fail."""

    def __init__(self) -> None:
        self.charges = 0

    async def charge(self, org_id: str, amount_nanos: int, idempotency_key: str) -> bool:
        self.charges += 1
        return False


async def test_reload_provider_failure_is_recorded_and_extra_usage_stops_with_the_balance(
    start_proxy,
):
    card = DecliningCard()
    proxy = await start_proxy(
        payments=card,
        plans=TINY_PLANS,
        orgs=org(
            "team",
            """
extra_usage = "all"
credits_usd = 0.02
auto_reload = { threshold_usd = 0.01, amount_usd = 0.02 }
""",
        ),
    )
    refusal, _ = await until_refused(proxy)
    assert refusal.response.json()["error"]["details"]["limit"] == "balance"
    assert card.charges == 1  # tried once at the crossing, and failed
    assert await transfers(proxy, "reload") == []
    assert await spent_nanos(proxy) <= 20_000_000


async def test_a_request_whose_worst_case_fits_no_limit_is_never_forwarded(start_proxy, upstream):
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "team",
            """
extra_usage = "all"
credits_usd = 0.01
""",
        ),
    )
    await ask(proxy)  # crosses the included session
    await quiet(proxy)
    forwarded = upstream.app[MOCK_STATE_KEY].messages_total
    client = sdk(proxy, ALICE_KEY)
    with pytest.raises(anthropic.RateLimitError) as caught:
        async with client.messages.stream(
            model="claude-opus-4-8", max_tokens=64_000, messages=PROMPT
        ) as stream:
            await stream.get_final_message()
    details = caught.value.response.json()["error"]["details"]
    assert details["limit"] == "balance"
    assert details["request_max_usd"].startswith("1.600")  # 64,000 x $25/MTok + a few input
    assert details["remaining_usd"] == "0.01"
    assert upstream.app[MOCK_STATE_KEY].messages_total == forwarded


async def test_200_parallel_requests_from_several_members_hold_the_limit_and_balance(
    start_proxy,
):
    """Limits that fit about 20 requests; 200 arrive at once from two members. The balance can
    cross its threshold only once before the org limit stops spending: exactly one reload."""
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "team",
            """
extra_usage = "all"
monthly_spend_limit_usd = 0.07
credits_usd = 0.06
auto_reload = { threshold_usd = 0.02, amount_usd = 0.05 }
""",
        ),
    )
    await ask(proxy)
    await ask(proxy, BOB_KEY)
    await quiet(proxy)  # both sessions crossed: what follows is extra usage
    answers = await asyncio.gather(
        *(
            ask(proxy, key, **{"x-mock-delay-ms": "20"})
            for key in (ALICE_KEY, BOB_KEY)
            for _ in range(100)
        )
    )
    ok = [a for a in answers if not isinstance(a, anthropic.APIStatusError)]
    assert 10 <= len(ok) <= 40
    await quiet(proxy)
    assert await transfers(proxy, "reload") == [50_000_000]
    overrun_nanos = -sum(await transfers(proxy, "estimate_overrun"))
    assert await spent_nanos(proxy) - overrun_nanos <= 70_000_000  # within the org limit


async def test_max_alerts_as_the_limit_approaches_reach_the_signed_webhook(
    start_proxy, aiohttp_server, monkeypatch
):
    from aiohttp import web

    from proxy.alerts import sign

    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        assert request.headers["x-usage-proxy-signature"] == sign(body, "whsec-test")
        received.append(await request.json())
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    hook_server = await aiohttp_server(receiver)
    monkeypatch.setenv("ACME_WEBHOOK_SECRET", "whsec-test")
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "max",
            f"""
extra_usage = "all"
monthly_spend_limit_usd = 0.02
credits_usd = 1
webhook = {{ url = "{hook_server.make_url("/hook")}", secret_env = "ACME_WEBHOOK_SECRET" }}
""",
        ),
    )
    refusal, _ = await until_refused(proxy)
    assert refusal.response.json()["error"]["details"]["limit"] == "org_monthly"
    for _ in range(100):
        if len([a for a in received if a["kind"] == "org_monthly"]) >= 3:
            break
        await asyncio.sleep(0.02)
    org_pct = sorted(a["threshold_pct"] for a in received if a["kind"] == "org_monthly")
    assert org_pct[:3] == [50, 75, 90]  # each once; 100% only if a request reached it
    assert len(org_pct) == len(set(org_pct))
    session = [a for a in received if a["kind"] == "session"]
    assert session and session[0]["member"] == "alice@acme.test"
    stored = await proxy.app[STORE].list_alerts("acme")
    assert len(stored) == len(received)


async def test_a_dead_webhook_never_fails_a_request(start_proxy):
    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "team",
            """
extra_usage = "all"
credits_usd = 1
monthly_spend_limit_usd = 0.01
webhook = { url = "http://127.0.0.1:9/hook", secret_env = "NO_SUCH_SECRET" }
""",
        ),
    )
    for _ in range(3):
        answer = await ask(proxy)
        assert not isinstance(answer, anthropic.APIStatusError)


async def test_member_usage_shows_windows_extra_usage_and_spend(start_proxy):
    import aiohttp

    proxy = await start_proxy(
        plans=TINY_PLANS,
        orgs=org(
            "team",
            """
extra_usage = "all"
monthly_spend_limit_usd = 10
credits_usd = 1
""",
        ),
    )

    async def usage(key: str = ALICE_KEY) -> dict:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                proxy.make_url("/v1/usage"), headers={"authorization": f"Bearer {key}"}
            ) as response,
        ):
            assert response.status == 200
            return await response.json()

    before = await usage()
    assert before["member"] == {
        "email": "alice@acme.test",
        "org": "acme",
        "tier": "standard",
        "role": "owner",
    }
    assert before["session"] == {
        "limit_usd": "0.001",
        "used_usd": "0",
        "remaining_usd": "0.001",
        "resets_at": None,
    }
    assert before["weekly"] is None
    await ask(proxy)
    await quiet(proxy)
    await ask(proxy)  # on extra usage (consent "always")
    await settled(proxy, 1)
    after = await usage()
    assert after["session"]["remaining_usd"] == "0"
    assert after["session"]["resets_at"] == "2026-01-01T05:00:00Z"
    extra = after["extra_usage"]
    assert extra["status"] == "active" and extra["consent"] == "always"
    records = await proxy.app[STORE].recent_requests(1)
    assert extra["month_spent_usd"] == extra["org_month_spent_usd"] != "0"
    assert records[0].extra_nanos > 0
    assert extra["member_limit_usd"] == "unlimited" and extra["org_limit_usd"] == "10"
    assert extra["balance_usd"] == format_usd(1_000_000_000 - records[0].extra_nanos)
    assert extra["month"] == "2026-01"


async def test_usage_cli_prints_a_readable_summary(start_proxy):
    import subprocess
    import sys

    proxy = await start_proxy(
        plans=TINY_PLANS, orgs=org("team", 'extra_usage = "all"\ncredits_usd = 1')
    )
    await ask(proxy)
    await quiet(proxy)
    url = str(proxy.make_url("")).rstrip("/")
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "usage", "--key", ALICE_KEY, "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "alice@acme.test (acme, standard)" in result.stdout
    assert "session" in result.stdout and "prepaid balance: $1" in result.stdout
