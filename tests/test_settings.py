"""Config files: one clear error naming file, key and problem; orgs.toml applies idempotently."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy.auth import hash_key
from proxy.errors import ConfigError
from proxy.orgfile import parse_orgs
from proxy.settings import Plans, load_settings
from proxy.store.sqlite import open_sqlite
from tests.conftest import ALICE_KEY, DEFAULT_ORGS, ConfigFactory

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_loads(tmp_path: Path) -> None:
    settings = load_settings(ROOT / "config" / "proxy.toml", env={"ANTHROPIC_API_KEY": "k"})
    assert settings.server.port == 8787
    assert settings.server.max_body_bytes == 32 * 1024 * 1024
    assert settings.upstream.api_key == "k"
    assert settings.plans.tiers["standard"].session_window_s == 5 * 3600
    assert settings.prices.lookup("claude-opus-4-8") is not None


def test_the_journal_is_next_to_the_config_file_or_none(config: ConfigFactory) -> None:
    assert config.settings().store.journal == str((config.root / "usage-proxy.journal").resolve())
    assert config.settings(store='journal = "j/a.journal"').store.journal == str(
        (config.root / "j" / "a.journal").resolve()
    )
    assert config.settings(store='journal = ""').store.journal == ""


def test_upstream_key_is_never_in_repr(config: ConfigFactory) -> None:
    settings = config.settings()
    assert "sk-ant-test-upstream-key" not in repr(settings)


@pytest.mark.parametrize(
    ("kwargs", "key", "problem"),
    [
        ({"server": "port = 99999"}, "server.port", "TCP port"),
        ({"server": 'port = "80"'}, "server.port", "expected a number"),
        ({"server": "colour = 1"}, "server.colour", "unknown key"),
        ({"upstream_url": "ftp://x"}, "upstream.base_url", "http"),
        ({"store": "pool_size = 0"}, "store.pool_size", "at least 1"),
        ({"store": "pool_timeout_s = -1"}, "store.pool_timeout_s", "at least"),
        ({"tables": "[alerts]\nthresholds_pct = [50, 150]\n"}, "alerts.thresholds_pct", "1 to 100"),
        (
            {"plans": "[tiers.standard]\nsession_window_hours = 5\n"},
            "tiers.standard.session_included_usd",
            "missing",
        ),
        (
            {"plans": "[tiers.standard]\nsession_included_usd = -1\n"},
            "tiers.standard.session_included_usd",
            "negative",
        ),
        (
            {"plans": '[tiers.standard]\nsession_included_usd = 1\nincluded_admission = "x"\n'},
            "tiers.standard.included_admission",
            "one of",
        ),
    ],
)
def test_bad_config_names_file_key_and_problem(
    config: ConfigFactory, kwargs: dict, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.settings(**kwargs)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert caught.value.source.endswith(".toml")


@pytest.mark.parametrize(
    ("orgs", "key", "problem"),
    [
        ('[[orgs]]\nid = "a"\nplan = "gold"\n', "orgs[0].plan", "one of"),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\ntimezone = "Mars/Base"\n',
            "orgs[0].timezone",
            "unknown time zone",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\n[[orgs.members]]\nemail = "x@y"\ntier = "gold"\n',
            "orgs[0].members[0].tier",
            "unknown tier",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\nextra_usage = ["nobody@y"]\n',
            "orgs[0].extra_usage",
            "not a member",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\ncredits_usd = -5\n',
            "orgs[0].credits_usd",
            "negative",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\nmonthly_spend_limit_usd = -1\n',
            "orgs[0].monthly_spend_limit_usd",
            "negative",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "enterprise"\ncredits_usd = 5\n',
            "orgs[0].credits_usd",
            "postpaid",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\ntier_limits_usd = { standard = 5 }\n',
            "orgs[0].tier_limits_usd",
            "enterprise",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "enterprise"\ntier_limits_usd = { gold = 5 }\n',
            "orgs[0].tier_limits_usd.gold",
            "unknown tier",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\nauto_reload = { threshold_usd = 5 }\n',
            "orgs[0].auto_reload",
            "both",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\nauto_reload = { threshold_usd = 5, amount_usd = 0 }\n',
            "orgs[0].auto_reload.amount_usd",
            "more than 0",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\nreservation = "sometimes"\n',
            "orgs[0].reservation",
            "expected",
        ),
        (
            '[[orgs]]\nid = "a"\nplan = "team"\nwebhook = { url = "ftp://x", secret_env = "S" }\n',
            "orgs[0].webhook.url",
            "http",
        ),
    ],
)
def test_bad_orgs_file_names_key(orgs: str, key: str, problem: str) -> None:
    plans = Plans.from_mapping({"tiers": {"standard": {"session_included_usd": 5}}}, "plans.toml")
    with pytest.raises(ConfigError) as caught:
        parse_orgs(tomllib.loads(orgs), "orgs.toml", plans)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_cli_exits_non_zero_with_one_line_for_a_bad_config(tmp_path: Path) -> None:
    path = ConfigFactory(tmp_path).write(server="port = 0")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "proxy.toml" in lines[0] and "server.port" in lines[0]


async def test_orgs_file_applies_idempotently_and_keeps_later_changes(tmp_path: Path) -> None:
    plans = Plans.from_mapping({"tiers": {"standard": {"session_included_usd": 5}}}, "plans.toml")
    orgs = parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", plans)
    store = await open_sqlite(str(tmp_path / "s.db"))
    try:
        await store.apply_orgs(orgs, 0.0)
        seat = await store.find_seat(hash_key(ALICE_KEY))
        assert seat is not None and seat.role == "owner"
        # a change made later (as the admin API would) survives a re-apply of the same file
        await store.update_member("acme", "alice@acme.test", {"role": "member"})
        await store.apply_orgs(orgs, 1.0)
        seat = await store.find_seat(hash_key(ALICE_KEY))
        assert seat is not None and seat.role == "member"
        rows = await store._read("SELECT COUNT(*) FROM members")
        assert rows[0][0] == 2
        # ...until the file itself changes that value
        changed = DEFAULT_ORGS.replace('role = "owner"', 'role = "primary_owner"')
        await store.apply_orgs(parse_orgs(tomllib.loads(changed), "o", plans), 2.0)
        seat = await store.find_seat(hash_key(ALICE_KEY))
        assert seat is not None and seat.role == "primary_owner"
    finally:
        await store.close()


async def test_admin_verify_reports_a_balance_that_differs_from_its_transfers(
    tmp_path: Path,
) -> None:
    import asyncio
    import json
    import sqlite3

    config = ConfigFactory(tmp_path / "config")  # SQLite: the test edits the file directly
    settings = config.settings()
    path = settings.store.url.removeprefix("sqlite:///")
    store = await open_sqlite(path)
    await store.apply_orgs(parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", settings.plans), 0)
    await store.close()
    command = [
        sys.executable,
        "-m",
        "proxy",
        "admin",
        "verify",
        "--config",
        str(config.root / "proxy.toml"),
    ]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *extra], capture_output=True, text=True, timeout=60)

    clean = await asyncio.to_thread(run)
    assert clean.returncode == 0, clean.stderr
    assert "pending_reservations: 0" in clean.stdout and "mismatches: 0" in clean.stdout
    with sqlite3.connect(path) as db:
        db.execute("UPDATE orgs SET balance_nanos = balance_nanos + 1")
    broken = await asyncio.to_thread(run, "--json")
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert report["mismatches"] == 1 and report["pending_reservations"] == 0
