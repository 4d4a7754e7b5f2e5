"""`usage-proxy admin migrate-store`: an embedded deployment moves to PostgreSQL intact."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from proxy.alerts import Alert
from proxy.auth import hash_key
from proxy.orgfile import parse_orgs
from proxy.settings import StoreSettings
from proxy.store import open_store
from tests.conftest import ALICE_KEY, DEFAULT_ORGS
from tests.store.test_contract import NOW_S, PLANS, TIERS, alice, asking, exhaust_session, settling


def migrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "admin", "migrate-store", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_a_sqlite_store_moves_to_postgresql_with_every_record(
    tmp_path: Path, postgres_url: str
) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'embedded.db'}"
    source = await open_store(StoreSettings(url=sqlite_url))
    await source.apply_orgs(parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", PLANS), NOW_S)
    member_id = await alice(source)
    await exhaust_session(source, member_id)  # included, then extra usage
    for i in range(30):
        await source.admit(asking(member_id, f"m{i}", 2_000_000, now_s=NOW_S + 1), TIERS)
        await source.settle(settling(f"m{i}", 1_500_000), TIERS)
    await source.admit(asking(member_id, "in-flight", 1, now_s=NOW_S + 2), TIERS)  # pending
    await source.purchase("acme", 7_000_000_000, "po-1", NOW_S + 3)
    await source.record_alert(
        Alert("acme", None, "balance_low", None, "p", NOW_S + 4, balance_nanos=1, limit_nanos=2)
    )
    secret = await source.secret("continue_link")
    statement = await source.statement("acme", "2026-01")
    await source.close()

    result = await asyncio.to_thread(migrate, "--from", sqlite_url, "--to", postgres_url, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["ledger_equal"] and report["mismatches"] == 0
    assert report["rows"]["requests"] == {"from": 32, "to": 32}
    assert report["rows"]["transfers"] == {"from": 32, "to": 32}  # credits, 30 charges, po-1
    assert report["rows"]["alerts"] == {"from": 1, "to": 1}

    target = await open_store(StoreSettings(url=postgres_url))
    try:
        seat = await target.find_seat(hash_key(ALICE_KEY))  # keys go on working
        assert seat is not None and seat.member_id == member_id
        assert await target.secret("continue_link") == secret  # and so do continue links
        assert await target.statement("acme", "2026-01") == statement
        assert (await target.get_request("in-flight")).status == "pending"
        # new ids start past the copied ones
        new_member = await target.create_member("acme", "carol@acme.test", {}, NOW_S + 5)
        assert new_member is not None and new_member > member_id
        bought = await target.purchase("acme", 1_000_000_000, "po-2", NOW_S + 6)
        assert bought.transfer_id == 33 and not bought.replayed
        assert (await target.verify(NOW_S + 7)).mismatches == ()
    finally:
        await target.close()

    again = await asyncio.to_thread(migrate, "--from", sqlite_url, "--to", postgres_url)
    assert again.returncode == 1
    assert "already holds organisations" in again.stderr
