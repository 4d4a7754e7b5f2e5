"""Included quota end to end: windows, the limit-reached response, the four ways to continue."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs
from yarl import URL

from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_ORGS, quiet, settled
from tests.test_e2e_sdk import PROMPT, sdk

pytestmark = pytest.mark.both_stores  # every test here on both stores

# $0.01 a session: one scripted request (1000 in + 200 out on Sonnet 4.5) costs $0.006.
SMALL_PLANS = """
[tiers.standard]
session_included_usd = 0.01
session_window_hours = 5
"""
WEEKLY_PLANS = SMALL_PLANS + "weekly_included_usd = 0.02\n"
COST = {"x-mock-input-tokens": "1000", "x-mock-output-tokens": "200"}
COST_NANOS = 6_000_000
ORGS_EXTRA_OFF = DEFAULT_ORGS.replace('extra_usage = "all"', 'extra_usage = "off"')
FIVE_HOURS_S = 5 * 3600


@pytest.fixture
async def small(start_proxy) -> TestServer:
    return await start_proxy(plans=SMALL_PLANS)


async def spend(proxy: TestServer, key: str = ALICE_KEY, times: int = 1, **headers: str):
    """Make `times` scripted requests through the SDK, one after another as a member would,
    each settled before the next (settlement runs just after the answer); return the last raw
    response."""
    raw = None
    for _ in range(times):
        raw = await sdk(proxy, key, **COST, **headers).messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=200, messages=PROMPT
        )
        await quiet(proxy)
    return raw


async def attempt(proxy: TestServer, headers: dict[str, str]) -> int:
    """One SDK request: 200 when answered, 429 when refused for quota."""
    try:
        await sdk(proxy, **headers).messages.create(
            model="claude-sonnet-4-5", max_tokens=200, messages=PROMPT
        )
        return 200
    except anthropic.RateLimitError:
        return 429


async def test_exhausted_session_is_refused_once_then_continue_then_reset(small, clock) -> None:
    first = await spend(small)
    assert first.headers["x-usage-session-limit"] == "0.01"
    assert first.headers["x-usage-session-remaining"] == "0.01"
    assert first.headers["x-usage-billing"] == "included"
    crossing = await spend(small)  # $0.004 left: admitted, its excess recorded as overrun
    assert crossing.headers["x-usage-session-remaining"] == "0.004"
    [crossed, _] = await settled(small, 2)
    assert (crossed.included_nanos, crossed.overrun_nanos) == (4_000_000, 2_000_000)

    client = anthropic.AsyncAnthropic(
        base_url=str(small.make_url("")).rstrip("/"), api_key=ALICE_KEY, default_headers=COST
    )  # SDK retries on
    with capture_logs() as logs, pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model="claude-sonnet-4-5", max_tokens=200, messages=PROMPT)
    attempts = [e for e in logs if e["event"] == "request"]
    assert len(attempts) == 1, "the SDK must honour x-should-retry: false"
    response = caught.value.response
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert int(response.headers["retry-after"]) == FIVE_HOURS_S
    assert response.headers["anthropic-ratelimit-unified-status"] == "rejected"
    assert response.headers["anthropic-ratelimit-unified-representative-claim"] == "five_hour"
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    details = error["details"]
    assert details["limit"] == "session"
    assert details["extra_usage"] == "available"
    assert details["used_usd"] == "0.012" and details["limit_usd"] == "0.01"
    assert details["resets_at"] == "2026-01-01T05:00:00Z"
    assert (
        int(response.headers["anthropic-ratelimit-unified-reset"]) == 1_767_225_600 + FIVE_HOURS_S
    )
    assert details["continue"]["header"] == "x-extra-usage: continue"
    assert details["continue"]["endpoint"] == "POST /v1/extra-usage/continue"
    assert details["continue"]["url"] in error["message"]
    assert "05:00 UTC" in error["message"]
    for phrase in ("credit balance is too low", "x-api-key", "organization has been disabled"):
        assert phrase not in error["message"]
    assert len(re.split(r"(?<=[.)])\s", error["message"])) <= 3

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            small.make_url("/v1/extra-usage/continue"), headers={"x-api-key": ALICE_KEY}
        ) as answer,
    ):
        assert answer.status == 200
        assert (await answer.json())["consent_until"] == "2026-01-01T05:00:00Z"

    extra = await spend(small)
    assert extra.headers["x-usage-billing"] == "extra"
    [record] = await settled(small)
    assert (record.billing, record.extra_nanos, record.included_nanos) == ("extra", COST_NANOS, 0)

    clock.advance(FIVE_HOURS_S)  # the window resets: included again, and consent has lapsed
    fresh = await spend(small)
    assert fresh.headers["x-usage-billing"] == "included"
    assert fresh.headers["x-usage-session-remaining"] == "0.01"
    assert fresh.headers["x-usage-session-reset"] == "2026-01-01T10:00:00Z"


async def test_continue_header_opts_in_on_the_request_itself(small) -> None:
    await spend(small, times=2)
    raw = await spend(small, **{"x-extra-usage": "continue"})
    assert raw.headers["x-usage-billing"] == "extra"
    assert (await spend(small)).headers["x-usage-billing"] == "extra"  # the choice lasts


async def test_continue_header_with_extra_usage_off_is_refused_not_ignored(start_proxy) -> None:
    proxy = await start_proxy(plans=SMALL_PLANS, orgs=ORGS_EXTRA_OFF)
    await spend(proxy, times=2)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await spend(proxy, **{"x-extra-usage": "continue"})
    error = caught.value.response.json()["error"]
    assert error["type"] == "billing_error"
    assert error["details"]["limit"] == "extra_usage_disabled"
    assert error["details"]["error_code"] == "credits_required"
    assert "ask an owner of acme" in error["message"].lower()


async def test_extra_usage_off_names_the_window_and_says_ask_an_owner(start_proxy) -> None:
    proxy = await start_proxy(plans=SMALL_PLANS, orgs=ORGS_EXTRA_OFF)
    await spend(proxy, times=2)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await spend(proxy)
    error = caught.value.response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["details"]["limit"] == "session"
    assert error["details"]["extra_usage"] == "disabled"
    assert "continue" not in error["details"]
    assert "ask an owner" in error["message"]


async def test_consent_always_continues_automatically(start_proxy) -> None:
    orgs = DEFAULT_ORGS.replace(
        f'key = "{BOB_KEY}"', f'key = "{BOB_KEY}"\nextra_usage_consent = "always"'
    )
    proxy = await start_proxy(plans=SMALL_PLANS, orgs=orgs)
    await spend(proxy, BOB_KEY, times=2)
    assert (await spend(proxy, BOB_KEY)).headers["x-usage-billing"] == "extra"


async def test_weekly_window_refusal_names_seven_day(start_proxy, clock) -> None:
    proxy = await start_proxy(plans=WEEKLY_PLANS)
    await spend(proxy, times=2)
    clock.advance(FIVE_HOURS_S)
    await spend(proxy, times=2)  # weekly $0.02 now crossed ($0.024)
    clock.advance(FIVE_HOURS_S)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await spend(proxy)
    response = caught.value.response
    assert response.json()["error"]["details"]["limit"] == "weekly"
    assert response.headers["anthropic-ratelimit-unified-representative-claim"] == "seven_day"
    assert int(response.headers["retry-after"]) == 7 * 24 * 3600 - 2 * FIVE_HOURS_S


async def test_continue_link_page_confirms_without_javascript(small, clock) -> None:
    await spend(small, times=2)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await spend(small)
    url = caught.value.response.json()["error"]["details"]["continue"]["url"]
    assert url.startswith("http://127.0.0.1:8787/continue/")  # server.public_url
    path = URL(url).path
    async with aiohttp.ClientSession() as http:
        with capture_logs() as logs:
            async with http.get(small.make_url(path)) as page:
                html = await page.text()
                assert page.status == 200
        token = path.rsplit("/", 1)[1]
        assert token not in str(logs)  # the link is a credential: never logged
        assert '<form method="post"' in html and "Continue with extra usage" in html
        assert "$3 per million input tokens" not in html  # example prices are the default model's
        assert "per million input tokens" in html
        # a forged token (another member's id) and an expired one are refused with a clear page
        forged = path.replace("/continue/1.", "/continue/2.")
        async with http.post(small.make_url(forged)) as page:
            assert page.status == 410
            assert "not valid" in await page.text()
        async with http.post(small.make_url(path)) as page:
            assert page.status == 200
            assert "until" in await page.text()
        assert (await spend(small)).headers["x-usage-billing"] == "extra"
        clock.advance(FIVE_HOURS_S)
        async with http.get(small.make_url(path)) as page:
            assert page.status == 410
            assert "expired" in await page.text()


async def test_continue_cli(small) -> None:
    await spend(small, times=2)
    url = str(small.make_url("")).rstrip("/")
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "continue", "--key", ALICE_KEY, "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Extra usage is on for you" in result.stdout
    assert (await spend(small)).headers["x-usage-billing"] == "extra"


async def test_count_tokens_is_never_refused_for_quota(small) -> None:
    await spend(small, times=2)
    count = await sdk(small).messages.count_tokens(model="claude-sonnet-4-5", messages=PROMPT)
    assert count.input_tokens > 0


async def test_concurrent_requests_at_the_edge_never_pass_a_worst_case_tier(start_proxy) -> None:
    """With included_admission = "worst_case", parallel requests never overshoot the window."""
    plans = SMALL_PLANS.replace(
        "session_window_hours = 5", 'session_window_hours = 5\nincluded_admission = "worst_case"'
    )
    proxy = await start_proxy(plans=plans, orgs=ORGS_EXTRA_OFF)

    # output = max_tokens, input as the mock counts it: each request meets its worst case
    headers = {"x-mock-output-tokens": "200", "x-mock-delay-ms": "50"}
    statuses = await asyncio.gather(*(attempt(proxy, headers) for _ in range(12)))
    records = await settled(proxy, statuses.count(200))
    shortfall = sum(max(0, r.cost_nanos - r.reserved_nanos) for r in records)
    assert shortfall == 0  # the estimate covered every request here
    assert statuses.count(200) == 3 and statuses.count(429) == 9  # 3 x ~$0.00303 fit in $0.01
    assert sum(r.cost_nanos for r in records) <= 10_000_000
    assert all(r.overrun_nanos == 0 for r in records)


async def test_concurrent_requests_with_any_remaining_overshoot_at_most_what_was_in_flight(
    small,
) -> None:
    """The documented overshoot: every request admitted before the window ran out finishes."""
    await spend(small)  # $0.006 of $0.01 used

    headers = {**COST, "x-mock-delay-ms": "500"}  # longer than 5 admissions on a busy machine
    first_wave = await asyncio.gather(*(attempt(small, headers) for _ in range(5)))
    assert first_wave == [200] * 5  # all in flight before any settled
    await quiet(small)
    assert await attempt(small, headers) == 429  # the next one sees the window exhausted
    records = await settled(small, 6)
    assert sum(r.overrun_nanos for r in records) == 6 * COST_NANOS - 10_000_000


async def test_demo_clock_endpoint_only_in_demo(small) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(small.make_url("/admin/v1/clock"), json={"advance_s": 60}) as response,
    ):
        assert response.status == 404


async def test_usage_headers_on_streams_too(small) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            small.make_url("/v1/messages"),
            json={
                "model": "claude-sonnet-4-5",
                "max_tokens": 50,
                "stream": True,
                "messages": PROMPT,
            },
            headers={"x-api-key": ALICE_KEY},
        ) as response,
    ):
        await response.read()
        assert response.headers["x-usage-billing"] == "included"
        assert response.headers["x-usage-session-limit"] == "0.01"
        assert response.headers["x-usage-extra-remaining"] == "100"  # the prepaid balance
        assert "x-usage-weekly-limit" not in response.headers
    [record] = await settled(small)
    assert record.billing == "included"


async def test_a_clock_moved_backwards_is_ignored_and_logged(small, clock) -> None:
    first = await spend(small)
    clock.set_s(clock.now_s() - 600)
    with capture_logs() as logs:
        again = await spend(small)
    assert again.headers["x-usage-session-reset"] == first.headers["x-usage-session-reset"]
    assert again.headers["x-usage-session-remaining"] == "0.004"
    assert any(e["event"] == "clock_went_back" for e in logs)


async def test_continue_with_consent_always_says_so(start_proxy) -> None:
    orgs = DEFAULT_ORGS.replace(
        f'key = "{BOB_KEY}"', f'key = "{BOB_KEY}"\nextra_usage_consent = "always"'
    )
    proxy = await start_proxy(plans=SMALL_PLANS, orgs=orgs)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.make_url("/v1/extra-usage/continue"), headers={"x-api-key": BOB_KEY}
        ) as answer,
    ):
        body = await answer.json()
    assert (body["consent"], body["consent_until"]) == ("always", None)


async def test_continue_before_any_request_lasts_as_long_as_the_window_it_opens(
    small, clock
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            small.make_url("/v1/extra-usage/continue"), headers={"x-api-key": ALICE_KEY}
        ) as answer,
    ):
        consent_until = (await answer.json())["consent_until"]
    clock.advance(600)
    first = await spend(small)
    assert first.headers["x-usage-session-reset"] == consent_until
