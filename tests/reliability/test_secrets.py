"""Keys and secrets: issued keys are long, random and kept only as SHA-256; short keys in
orgs.toml are a config error; secrets are compared in constant time; no key, token or prompt is
ever logged; the upstream key never reaches a client; a member key never opens an admin route;
a continue link is bound to one member and to its window."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy.admin.routes import ROUTES
from proxy.auth import ISSUED_KEY_PREFIX, VISIBLE_PREFIX_CHARS, hash_key
from proxy.continuation import ContinueLinks, InvalidLink
from proxy.errors import ConfigError
from proxy.orgfile import load_orgs, parse_orgs
from proxy.settings import Plans
from tests.conftest import (
    ADMIN_TOKEN,
    ALICE_KEY,
    BOB_KEY,
    CONFIG_DIR,
    DEFAULT_ORGS,
    REVOKED_KEY,
    UPSTREAM_KEY,
    ConfigFactory,
)
from tests.reliability.conftest import (
    ROOT,
    exchange_raw,
    status_of,
    store_rows,
    stream_message,
)

PLANS = Plans.load(CONFIG_DIR / "plans.toml")
PROMPT = "the-secret-prompt-text-that-must-never-be-logged"
# $0.01 a session: the second scripted request runs out and gets a continue link.
SMALL_PLANS = """
[tiers.standard]
session_included_usd = 0.01
"""
COST = {"x-mock-input-tokens": "1000", "x-mock-output-tokens": "1500"}


def test_short_keys_in_orgs_toml_are_a_config_error_naming_file_and_key(tmp_path: Path) -> None:
    for short, where in (
        ('key = "sk-short"', "orgs[0].members[0].key"),
        (f'key = ["{ALICE_KEY}", "tiny"]', "orgs[0].members[0].key[1]"),
        (f'key = " {ALICE_KEY} "', "orgs[0].members[0].key"),
    ):
        path = tmp_path / "orgs.toml"
        path.write_text(
            '[[orgs]]\nid = "acme"\nplan = "team"\n[[orgs.members]]\n'
            f'email = "a@acme.test"\n{short}\n'
        )
        with pytest.raises(ConfigError) as caught:
            load_orgs(path, PLANS)
        assert str(caught.value).startswith(f"{path}: {where}: must be a string of at least 20")
        assert "sk-short" not in str(caught.value) and "tiny" not in str(caught.value)


def test_serve_refuses_a_short_key_with_one_line_and_status_2(tmp_path: Path) -> None:
    config = ConfigFactory(tmp_path / "config").write(
        orgs=DEFAULT_ORGS.replace(BOB_KEY, "sk-bob-1234")
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"usage-proxy: config error: {config.parent / 'orgs.toml'}: orgs[0].members[1].key: "
        "must be a string of at least 20 characters without surrounding spaces (make one with: "
        "python3 -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(32))')"
    )


def test_the_shipped_and_test_org_files_comply() -> None:
    for name in ("demo-orgs.toml", "orgs.toml"):
        load_orgs(CONFIG_DIR / name, PLANS)
    parse_orgs(tomllib.loads(DEFAULT_ORGS), "tests/conftest.py", PLANS)


SECRET_NAMES = re.compile(r"(token|secret|csrf|tag|signature|password|digest)$", re.IGNORECASE)


def test_secrets_are_never_compared_with_equals() -> None:
    """A comparison of a token, secret, tag or signature must be hmac.compare_digest: `==`
    returns as soon as a byte differs, which leaks how much of a guess was right."""
    offenders = []
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            for operand in (node.left, *node.comparators):
                name = ast.unparse(operand)
                if isinstance(operand, ast.Name | ast.Attribute) and SECRET_NAMES.search(name):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_continue_links_are_bound_to_one_member_one_window_and_one_database() -> None:
    links = ContinueLinks("a" * 64, "http://proxy")
    token = links.token(7, expires_at_s=1000)
    member, expires, tag = token.split(".")
    assert (member, expires, len(tag)) == ("7", "1000", 32)  # 128 bits of HMAC-SHA256
    assert links.member_id(token, now_s=999) == 7
    for forged in (
        f"8.{expires}.{tag}",  # another member
        f"7.2000.{tag}",  # a longer life
        f"7.{expires}.{tag[:-1]}0" if tag[-1] != "0" else f"7.{expires}.{tag[:-1]}1",
        f"7.{expires}.",
        "",
        "7.1000",
        "\u00e9.1000." + tag,
    ):
        with pytest.raises(InvalidLink):
            links.member_id(forged, now_s=0)
    with pytest.raises(InvalidLink, match="expired"):
        links.member_id(token, now_s=1000)  # at the window's reset it is dead
    other_database = ContinueLinks("b" * 64, "http://proxy")
    with pytest.raises(InvalidLink):
        other_database.member_id(token, now_s=0)


async def test_issued_keys_are_long_random_and_stored_only_as_hashes(start_proxy, config) -> None:
    proxy = await start_proxy()
    issued = []
    async with aiohttp.ClientSession() as http:
        for email in ("carol@acme.test", "dave@acme.test"):
            async with http.post(
                proxy.make_url("/admin/v1/orgs/acme/members"),
                json={"email": email, "role": "member"},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as response:
                assert response.status == 201
                issued.append((await response.json())["key"])
    for key in issued:
        assert re.fullmatch(re.escape(ISSUED_KEY_PREFIX) + r"[A-Za-z0-9_-]{43}", key)
    assert issued[0] != issued[1]
    rows = store_rows(config.root / "proxy.toml", "SELECT key_sha256, prefix FROM keys")
    for key in issued:
        assert (hash_key(key), key[:VISIBLE_PREFIX_CHARS]) in rows
    stored = b"".join(p.read_bytes() for p in config.root.glob("proxy.db*"))
    for key in (*issued, ALICE_KEY, BOB_KEY, REVOKED_KEY):
        assert key.encode() not in stored  # only hashes and short prefixes are kept
        assert key[VISIBLE_PREFIX_CHARS:].encode() not in stored


def fill(path: str) -> str:
    return (
        path.replace("{org}", "acme")
        .replace("{email}", "alice@acme.test")
        .replace("{tier}", "standard")
        .replace("{prefix}", ALICE_KEY[:VISIBLE_PREFIX_CHARS])
        .replace("{month}", "2026-01")
    )


async def test_no_admin_route_is_reachable_with_a_member_key(start_proxy) -> None:
    proxy = await start_proxy()
    assert len(ROUTES) >= 14  # the whole table, whatever is added later
    async with aiohttp.ClientSession() as http:
        for route in ROUTES:
            for headers in ({"x-api-key": BOB_KEY}, {"authorization": f"Bearer {BOB_KEY}"}):
                async with http.request(
                    route.method, proxy.make_url(fill(route.path)), json={}, headers=headers
                ) as response:
                    assert response.status == 403, (route.method, route.path, response.status)
    for path in ("/admin/v1/orgs/acme/", "/admin/v1/orgs/acme/../acme", "/ADMIN/v1/orgs/acme"):
        answer = await exchange_raw(
            proxy.port,
            f"GET {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {BOB_KEY}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(answer) in (403, 404), (path, answer)


async def test_a_full_run_never_logs_a_key_token_or_prompt_nor_shows_the_upstream_key(
    proxy_process, upstream
) -> None:
    proxy = proxy_process(upstream, plans=SMALL_PLANS)
    proxy.start()
    seen = []  # every byte a client got back, but the mock's echo of what it received
    async with aiohttp.ClientSession() as http:

        async def call(
            method: str, path: str, *, record: bool = True, **kwargs
        ) -> aiohttp.ClientResponse:
            async with http.request(method, proxy.url + path, **kwargs) as response:
                body = await response.read()
                if record:
                    seen.append(str(response.headers).encode() + body)
                response.body_bytes = body  # type: ignore[attr-defined]
                return response

        message = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 2000,
            "system": PROMPT,
            "messages": [{"role": "user", "content": PROMPT}],
        }
        created = await call(
            "POST",
            "/admin/v1/orgs/acme/members",
            json={"email": "carol@acme.test"},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        carol_key = json.loads(created.body_bytes)["key"]
        seen.pop()  # that answer shows Carol's key once, by design
        keys = (ALICE_KEY, BOB_KEY, REVOKED_KEY, carol_key)
        for key in keys:
            for headers in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
                await call("POST", "/v1/messages", json=message, headers={**headers, **COST})
                await call("POST", "/v1/messages/count_tokens", json=message, headers=headers)
                await call("GET", "/v1/models", headers=headers)
                await call("GET", "/v1/usage", headers=headers)
                await call("GET", "/admin/v1/orgs/acme", headers=headers)
                await call("POST", "/v1/files", data=PROMPT, headers=headers, record=False)
        await call(
            "POST", "/v1/messages", json=message, headers={"x-api-key": "sk-wrong-" + "0" * 20}
        )
        await call("POST", "/v1/messages", json=message, headers={"x-api-key": UPSTREAM_KEY})
        result = await stream_message(
            http, proxy.url, ALICE_KEY, headers={**COST, "x-mock-fail": "cut-stream"}
        )
        seen.append(result.body)
        refused = await call(
            "POST", "/v1/messages", json=message, headers={"x-api-key": BOB_KEY, **COST}
        )
        assert refused.status == 429
        link = json.loads(refused.body_bytes)["error"]["details"]["continue"]["url"]
        token = URL(link).path.rsplit("/", 1)[1]
        await call("GET", URL(link).path)
        await call("POST", URL(link).path)
        await call("POST", URL(link).path[:-3] + "abc")
        form = await call("GET", "/ui/login")
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', form.body_bytes).group(1).decode()
        await call("POST", "/ui/login", data={"key": BOB_KEY, "csrf_token": csrf})
        await call("GET", "/metrics")
    proxy.signal(2)  # SIGINT: a clean stop, the last lines flushed
    assert await proxy.wait() == 0
    logs = "".join(proxy.lines)
    events = [event["event"] for event in proxy.log_events()]
    assert events.count("request") >= 40  # the run was logged, request by request
    for secret in (*keys, UPSTREAM_KEY, ADMIN_TOKEN, token, PROMPT, "sk-wrong-" + "0" * 20):
        assert secret not in logs
    for answer in seen:
        assert UPSTREAM_KEY.encode() not in answer
