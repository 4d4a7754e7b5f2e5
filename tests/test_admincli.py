"""`usage-proxy admin ...` as an operator runs it: in process on a config, and against a proxy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import anthropic

from tests.conftest import ADMIN_TOKEN, ALICE_KEY, ConfigFactory
from tests.test_e2e_sdk import PROMPT


def admin(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "admin", *argv], capture_output=True, text=True, timeout=60
    )


async def test_a_team_set_up_from_the_command_line_on_a_config(config: ConfigFactory) -> None:
    path = str(config.write(orgs="orgs = []\n"))
    steps = [
        ("org", "create", "acme", "--plan", "team", "--timezone", "Europe/Rome"),
        ("org", "set", "acme", "--extra-usage", "all", "--limit", "100", "--auto-reload", "10:50"),
        ("credits", "acme", "20", "--idempotency-key", "first-purchase"),
        ("member", "add", "acme", "alice@acme.test", "--role", "owner", "--tier", "premium"),
    ]
    outputs = []
    for step in steps:
        result = await asyncio.to_thread(admin, *step, "--config", path, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(json.loads(result.stdout))
    assert outputs[2]["balance_usd"] == "20"
    key = outputs[3]["key"]
    shown = await asyncio.to_thread(admin, "org", "show", "acme", "--config", path)
    assert shown.returncode == 0
    table = shown.stdout
    assert "monthly_spend_limit_usd: 100" in table and "balance_usd: 20" in table
    assert "auto_reload.threshold_usd: 10" in table
    assert "alice@acme.test" in table and "premium" in table
    assert key not in table
    replay = await asyncio.to_thread(
        admin, "credits", "acme", "25", "--idempotency-key", "first-purchase", "--config", path
    )
    assert replay.returncode == 1 and "idempotency_key" in replay.stdout


async def test_against_a_running_proxy_with_the_operator_token(proxy) -> None:
    url = str(proxy.make_url("")).rstrip("/")
    made = await asyncio.to_thread(
        admin,
        "member",
        "add",
        "acme",
        "erin@acme.test",
        "--url",
        url,
        "--token",
        ADMIN_TOKEN,
        "--json",
    )
    assert made.returncode == 0, made.stdout
    key = json.loads(made.stdout)["key"]
    client = anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0)
    await client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=PROMPT)
    prefix = key[:12]
    revoked = await asyncio.to_thread(
        admin, "key", "revoke", prefix, "--url", url, "--token", ADMIN_TOKEN
    )
    assert revoked.returncode == 0 and f"revoked: {prefix}" in revoked.stdout
    denied = await asyncio.to_thread(
        admin, "org", "show", "acme", "--url", url, "--token", "sk-wrong-0000000000000000000"
    )
    assert denied.returncode == 1 and "not valid" in denied.stdout


async def test_member_commands_take_the_key_claude_code_uses(proxy) -> None:
    """`usage-proxy usage` / `continue` read $ANTHROPIC_AUTH_TOKEN when $ANTHROPIC_API_KEY is
    unset, as Claude Code does in interactive mode."""
    url = str(proxy.make_url("")).rstrip("/")
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "usage", "--url", url],
        env={**env, "ANTHROPIC_AUTH_TOKEN": ALICE_KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "alice@acme.test" in shown.stdout
