"""The web pages in headless Chromium (Debian's, driven by Playwright; never a downloaded
browser): what an owner clicks, what a member then sees, and screenshots of the main pages.

Without chromium (or the playwright package) these tests skip with one line; with
USAGE_PROXY_REQUIRE_BROWSER=1 (set by .ci/run) they fail instead."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ALICE_KEY, BOB_KEY
from tests.test_e2e_sdk import PROMPT, sdk, settled
from tests.ui.conftest import DAVE_KEY, ERIN_KEY, api

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(
    os.environ.get("USAGE_PROXY_SCREENSHOTS")
    or Path(__file__).resolve().parents[2] / "docs" / "screenshots"
)
ENTERPRISE = f"""
[[orgs]]
id = "globex"
plan = "enterprise"
extra_usage = "off"

[[orgs.members]]
email = "dave@globex.test"
role = "primary_owner"
tier = "premium"
key = "{DAVE_KEY}"

[[orgs.members]]
email = "erin@globex.test"
role = "member"
tier = "standard"
key = "{ERIN_KEY}"
"""
TEAM = f"""
[[orgs]]
id = "acme"
plan = "team"
extra_usage = "all"
monthly_spend_limit_usd = 100
credits_usd = 50
auto_reload = {{ threshold_usd = 10, amount_usd = 25 }}

[[orgs.members]]
email = "alice@acme.test"
role = "owner"
tier = "premium"
key = "{ALICE_KEY}"
extra_usage_consent = "always"

[[orgs.members]]
email = "bob@acme.test"
role = "member"
tier = "standard"
key = "{BOB_KEY}"
"""


def _missing_browser() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not (shutil.which("chromium") or Path(CHROMIUM).exists()):
        return "chromium is not installed (apt-get install -y chromium)"
    return None


@pytest.fixture
def browser_ready() -> None:
    missing = _missing_browser()
    if missing:
        if os.environ.get("USAGE_PROXY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"USAGE_PROXY_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)


@pytest.fixture
async def browser(browser_ready: None) -> AsyncIterator:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=shutil.which("chromium") or CHROMIUM, args=CHROMIUM_ARGS
        )
        yield chromium
        await chromium.close()


async def signed_in(browser, server: TestServer, key: str, **context: object):
    """A new browser context (its own cookies) signed in with `key`, on its home page."""
    from playwright.async_api import expect

    context = {"viewport": {"width": 1100, "height": 900}, **context}
    page = await (await browser.new_context(**context)).new_page()
    await page.goto(str(server.make_url("/ui/login")))
    await page.get_by_label("Key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    return page


async def shot(page, name: str, *, full_page: bool = True) -> None:
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


async def spend(server: TestServer, key: str, model: str, output_tokens: int) -> None:
    await sdk(server, key, **{"x-mock-output-tokens": str(output_tokens)}).messages.create(
        model=model, max_tokens=output_tokens, messages=PROMPT
    )
    await settled(server)


async def test_owner_sets_limits_and_the_member_sees_them(start_proxy, browser) -> None:
    """Enable, Adjust limit (Set limit, Set to unlimited), the pencil of a seat tier; the
    member's page and GET /v1/usage show each change on the next request."""
    from playwright.async_api import expect

    server = await start_proxy(orgs=ENTERPRISE)
    owner = await signed_in(browser, server, DAVE_KEY)
    await expect(owner.get_by_role("heading", name="globex")).to_be_visible()
    await owner.get_by_role("link", name="Usage", exact=True).click()

    await owner.get_by_role("button", name="Enable", exact=True).click()
    await expect(owner.get_by_role("status")).to_have_text(
        "Extra usage is on for the whole organisation."
    )
    assert (await api(server, "GET", "/admin/v1/orgs/globex"))[1]["extra_usage"] == "all"
    assert (await api(server, "GET", "/v1/usage", ERIN_KEY))[1]["extra_usage"][
        "status"
    ] == "available"

    await owner.get_by_role("button", name="Adjust limit").click()
    dialog = owner.locator("dialog[open]")
    await expect(dialog).to_have_count(1)
    await dialog.get_by_label("Amount (USD per month)").fill("75")
    await shot(owner, "adjust-limit-dialog", full_page=False)
    await dialog.get_by_role("button", name="Set limit").click()
    await expect(owner.get_by_test_id("spend-limit")).to_have_text("$75")
    assert (await api(server, "GET", "/v1/usage", ERIN_KEY))[1]["extra_usage"][
        "org_limit_usd"
    ] == "75"

    member = await signed_in(browser, server, ERIN_KEY)
    await expect(member.get_by_test_id("org-limit")).to_have_text("$75")
    await expect(member.get_by_test_id("extra-status")).to_have_text("Available")

    await owner.get_by_role("button", name="Adjust limit").click()
    await owner.locator("dialog[open]").get_by_role("button", name="Set to unlimited").click()
    await expect(owner.get_by_test_id("spend-limit")).to_have_text("Unlimited")

    await owner.get_by_role("button", name="Edit Standard limit").click()
    dialog = owner.locator("dialog[open]")
    await dialog.get_by_label("Amount (USD per month)").fill("30")
    await dialog.get_by_role("button", name="Set limit").click()
    await expect(owner.get_by_test_id("tier-limit-standard")).to_have_text("$30")
    await shot(owner, "usage-enterprise")

    await member.reload()  # the member's next request
    await expect(member.get_by_test_id("org-limit")).to_have_text("Unlimited")
    await expect(member.get_by_test_id("member-limit")).to_have_text("$30")
    usage = (await api(server, "GET", "/v1/usage", ERIN_KEY))[1]["extra_usage"]
    assert (usage["org_limit_usd"], usage["member_limit_usd"]) == ("unlimited", "30")

    response = await member.goto(str(server.make_url("/ui/orgs/globex/usage")))
    assert response is not None and response.status == 403
    await expect(member.get_by_role("alert")).to_have_text(
        "Only owners and primary owners manage organisations."
    )


async def test_a_form_without_its_csrf_token_is_refused(start_proxy, browser) -> None:
    from playwright.async_api import expect

    server = await start_proxy(orgs=ENTERPRISE)
    owner = await signed_in(browser, server, DAVE_KEY)
    await owner.goto(str(server.make_url("/ui/orgs/globex/usage")))
    await owner.locator("#extra-usage input[name=csrf_token]").evaluate("e => e.remove()")
    await owner.get_by_role("button", name="Enable", exact=True).click()
    await expect(owner.get_by_role("heading", name="Not allowed here")).to_be_visible()
    await expect(owner.get_by_role("alert")).to_contain_text("CSRF token is missing or wrong")
    assert (await api(server, "GET", "/admin/v1/orgs/globex"))[1]["extra_usage"] == "off"


async def test_the_dialog_works_from_the_keyboard_and_without_javascript(
    start_proxy, browser
) -> None:
    from playwright.async_api import expect

    server = await start_proxy(orgs=ENTERPRISE)
    owner = await signed_in(browser, server, DAVE_KEY)
    await owner.goto(str(server.make_url("/ui/orgs/globex/usage")))
    opener = owner.get_by_role("button", name="Adjust limit")
    await opener.focus()
    await owner.keyboard.press("Enter")
    dialog = owner.locator("dialog[open]")
    await expect(dialog.get_by_label("Amount (USD per month)")).to_be_focused()
    await owner.keyboard.press("Escape")
    await expect(dialog).to_have_count(0)
    await expect(opener).to_be_focused()

    no_js = await signed_in(browser, server, DAVE_KEY, java_script_enabled=False)
    await no_js.goto(str(server.make_url("/ui/orgs/globex/usage")))
    await no_js.get_by_role("link", name="Adjust limit").click()  # a page of its own
    await expect(no_js.get_by_role("heading", name="Adjust spend limit")).to_be_visible()
    await no_js.get_by_label("Amount (USD per month)").fill("12")
    await no_js.get_by_role("button", name="Set limit").click()
    await expect(no_js.get_by_test_id("spend-limit")).to_have_text("$12")
    assert (await api(server, "GET", "/admin/v1/orgs/globex"))[1]["monthly_spend_limit_usd"] == "12"


async def test_a_blocked_member_continues_and_the_main_pages(start_proxy, clock, browser) -> None:
    """A month of team usage (two members, two models), the member who ran out continues
    with the page's button; screenshots of the owner's and the member's pages."""
    from playwright.async_api import expect

    server = await start_proxy(orgs=TEAM)
    for day in range(9):
        await spend(server, ALICE_KEY, "claude-opus-4-8", 4000 + 3000 * (day % 4))
        await spend(server, ALICE_KEY, "claude-sonnet-4-5", 6000 + 2000 * (day % 3))
        if day % 2:
            await spend(server, BOB_KEY, "claude-sonnet-4-5", 9000 + 4000 * (day % 3))
        clock.advance(24 * 3600)
    while (await api(server, "GET", "/v1/usage", BOB_KEY))[1]["session"]["remaining_usd"] != "0":
        await spend(server, BOB_KEY, "claude-opus-4-8", 20_000)  # $0.50 each, of $5

    member = await signed_in(browser, server, BOB_KEY)
    await expect(member.get_by_role("heading", name="Your usage")).to_be_visible()
    await shot(member, "member-blocked")
    await member.get_by_role("button", name="Continue with extra usage").click()
    await expect(member.get_by_role("status")).to_contain_text("Extra usage is on for you until")
    await expect(member.get_by_test_id("extra-status")).to_have_text("On")
    assert (await api(server, "GET", "/v1/usage", BOB_KEY))[1]["extra_usage"]["status"] == "active"

    owner = await signed_in(browser, server, ALICE_KEY)
    await expect(
        owner.get_by_role("heading", name="Daily spend by member and model")
    ).to_be_visible()
    await expect(owner.locator(".chart rect")).not_to_have_count(0)
    await shot(owner, "overview")
    await owner.get_by_role("link", name="Usage", exact=True).click()
    await expect(owner.get_by_role("heading", name="Auto-reload")).to_be_visible()
    await expect(owner.get_by_label("Reload when balance reaches (USD)")).to_have_value("10")
    await shot(owner, "usage-team")
    await owner.get_by_role("link", name="Members").click()
    await expect(owner.get_by_role("row", name="bob@acme.test")).to_contain_text("Standard")
    await shot(owner, "members")
    await owner.get_by_role("link", name="Statements").click()
    await expect(owner.get_by_role("link", name="Download CSV")).to_be_visible()
    await shot(owner, "statements")

    phone = await signed_in(browser, server, ALICE_KEY, viewport={"width": 390, "height": 844})
    await phone.goto(str(server.make_url("/ui/orgs/acme/usage")))
    width_px = await phone.evaluate("document.documentElement.scrollWidth")
    assert width_px <= 390  # nothing runs off a narrow screen
    await shot(phone, "usage-narrow")
