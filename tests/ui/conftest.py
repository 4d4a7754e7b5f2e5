"""The web pages' fixtures: orgs of both billing kinds, and a client that keeps its session
cookie and sends forms with the CSRF token of the page they came from."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ADMIN_TOKEN, ALICE_KEY, BOB_KEY

DAVE_KEY = "sk-test-dave-00000000000000000005"
ERIN_KEY = "sk-test-erin-00000000000000000006"
UI_ORGS = f"""
[[orgs]]
id = "acme"
plan = "team"
extra_usage = "off"
credits_usd = 10

[[orgs.members]]
email = "alice@acme.test"
role = "owner"
tier = "standard"
key = "{ALICE_KEY}"

[[orgs.members]]
email = "bob@acme.test"
role = "member"
tier = "standard"
key = "{BOB_KEY}"

[[orgs]]
id = "globex"
plan = "enterprise"
extra_usage = "all"
monthly_spend_limit_usd = 500

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
# A session of $0.001 (one request of ~$0.003 uses it up) and a weekly allowance.
UI_PLANS = """
[tiers.standard]
session_included_usd = 0.001
weekly_included_usd = 1
[tiers.premium]
session_included_usd = 25
"""
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class WebClient:
    """A browser without a browser: cookies kept, forms posted with their page's CSRF token."""

    def __init__(self, server: TestServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.csrf_token: str | None = None

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.server.make_url(path), allow_redirects=False) as r:
            text = await r.text()
            found = _CSRF.search(text)
            if found:
                self.csrf_token = found.group(1)
            return r.status, text

    async def post(
        self, path: str, data: Mapping[str, str] | list[tuple[str, str]], *, csrf: bool = True
    ) -> aiohttp.ClientResponse:
        fields = list(data.items()) if isinstance(data, Mapping) else list(data)
        if csrf:
            assert self.csrf_token, "GET a page with a form first"
            fields.append(("csrf_token", self.csrf_token))
        async with self.http.post(
            self.server.make_url(path), data=fields, allow_redirects=False
        ) as r:
            await r.read()
            return r

    async def sign_in(self, key: str) -> aiohttp.ClientResponse:
        await self.get("/ui/login")
        return await self.post("/ui/login", {"key": key})

    def session_cookie(self) -> str | None:
        cookie = self.http.cookie_jar.filter_cookies(self.server.make_url("/ui/"))
        morsel = cookie.get("usage_proxy_session")
        return morsel.value if morsel else None


@pytest.fixture
async def ui(start_proxy) -> TestServer:
    return await start_proxy(orgs=UI_ORGS, plans=UI_PLANS)


@pytest.fixture
async def web_client(ui: TestServer) -> AsyncIterator:
    """web_client(key=None): a fresh client, signed in with `key` when given."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(key: str | None = None) -> WebClient:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # 127.0.0.1
        sessions.append(http)
        client = WebClient(ui, http)
        if key is not None:
            response = await client.sign_in(key)
            assert response.status == 303, response.status
        return client

    yield make
    for http in sessions:
        await http.close()


async def api(
    server: TestServer, method: str, path: str, key: str = ADMIN_TOKEN, body: object = None
) -> tuple[int, dict]:
    """The admin API (or GET /v1/usage) as the JSON clients see it."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            server.make_url(path),
            data=json.dumps(body).encode() if body is not None else None,
            headers={"authorization": f"Bearer {key}"},
        ) as response,
    ):
        return response.status, await response.json()
