"""kill -9 of a real `usage-proxy serve` with 100 streams in flight, then a restart on the same
store: every admitted request ends in exactly one settled record, nothing is charged twice, the
reservations are released and the ledger still sums."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.store.journal import read_records
from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY
from tests.reliability.conftest import store_rows, stream_message, verify_cli

IN_FLIGHT = 100
DONE_BEFORE = 5
KEY = "sk-test-crash-alice-0000000000000001"
# A tiny included quota and consent "always": the requests after the first few run on extra
# usage, so the crash leaves prepaid-balance and month-spend reservations behind, not only
# window ones.
PLANS = """
[tiers.standard]
session_included_usd = 0.000001
"""
ORGS = f"""
[[orgs]]
id = "acme"
plan = "team"
extra_usage = "all"
credits_usd = 100

[[orgs.members]]
email = "alice@acme.test"
role = "owner"
key = "{KEY}"
extra_usage_consent = "always"
"""
SLOW_STREAM = {"x-mock-deltas": "300", "x-mock-output-tokens": "600", "x-mock-delay-ms": "200"}


async def test_kill_9_with_100_streams_in_flight_then_restart(proxy_process, upstream) -> None:
    proxy = proxy_process(
        upstream,
        orgs=ORGS,
        plans=PLANS,
        store="reservation_ttl_s = 10\nsweep_interval_s = 0.2",
    )
    proxy.start()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    ) as http:
        for _ in range(DONE_BEFORE):  # settled normally before the crash: posted
            done = await stream_message(http, proxy.url, KEY)
            assert done.status == 200 and done.completed
        starts = [asyncio.Event() for _ in range(IN_FLIGHT)]
        streams = [
            asyncio.ensure_future(
                stream_message(http, proxy.url, KEY, headers=SLOW_STREAM, started=started)
            )
            for started in starts
        ]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), timeout=90)
        assert store_rows(proxy.config_path, "SELECT SUM(balance_reserved_nanos) FROM orgs")[0][0]
        proxy.kill()  # SIGKILL: no finally, no drain, no settlement
        broken = await asyncio.gather(*streams)
    assert [r.status for r in broken] == [200] * IN_FLIGHT  # all were admitted and relaying
    assert not any(r.completed for r in broken)

    pending = store_rows(proxy.config_path, "SELECT COUNT(*) FROM requests WHERE status='pending'")
    journal = read_records(str(proxy.config_path.parent / "proxy.db-writes"))
    # the crash left reservations behind (unless the TTL passed): in the tables, or in the
    # write-behind journal, whose records the restart applies first
    assert pending[0][0] + len(journal) > 0
    proxy.start()  # the same config and SQLite file
    for _ in range(300):  # the sweeper runs at start and every 0.2 s; reservations live 10 s
        left = store_rows(proxy.config_path, "SELECT COUNT(*) FROM requests WHERE status='pending'")
        if left[0][0] == 0:
            break
        await asyncio.sleep(0.1)

    statuses = dict(
        store_rows(proxy.config_path, "SELECT status, COUNT(*) FROM requests GROUP BY status")
    )
    assert statuses == {"posted": DONE_BEFORE, "expired": IN_FLIGHT}  # one record each
    # The recovery rule: an expired reservation is released and charges nothing.
    assert store_rows(
        proxy.config_path,
        "SELECT SUM(cost_nanos), SUM(extra_nanos), SUM(included_nanos), SUM(overrun_nanos) "
        "FROM requests WHERE status = 'expired'",
    ) == [(0, 0, 0, 0)]
    assert store_rows(
        proxy.config_path,
        "SELECT (SELECT SUM(reserved_nanos) FROM windows), (SELECT SUM(reserved_nanos) FROM "
        "spend), (SELECT SUM(balance_reserved_nanos) FROM orgs)",
    ) == [(0, 0, 0)]
    # No double charge: no transfer for an expired request, at most one of each kind per request.
    assert store_rows(
        proxy.config_path,
        "SELECT COUNT(*) FROM transfers t JOIN requests r ON r.id = t.request_id "
        "WHERE r.status <> 'posted'",
    ) == [(0,)]
    assert (
        store_rows(
            proxy.config_path,
            "SELECT request_id, kind, COUNT(*) FROM transfers WHERE request_id IS NOT NULL "
            "GROUP BY request_id, kind HAVING COUNT(*) > 1",
        )
        == []
    )
    verified = verify_cli(proxy.config_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "pending_reservations: 0" in verified.stdout and "mismatches: 0" in verified.stdout

    async with aiohttp.ClientSession() as http:  # and it serves again
        after = await stream_message(http, proxy.url, KEY)
    assert after.status == 200 and after.completed
    for _ in range(100):
        if not store_rows(proxy.config_path, "SELECT 1 FROM requests WHERE status = 'pending'"):
            break
        await asyncio.sleep(0.05)
    assert dict(
        store_rows(proxy.config_path, "SELECT status, COUNT(*) FROM requests GROUP BY status")
    ) == {"posted": DONE_BEFORE + 1, "expired": IN_FLIGHT}

    logs = "".join(proxy.lines)
    assert '"reservations_expired"' in logs
    for secret in (KEY, UPSTREAM_KEY, ADMIN_TOKEN):
        assert secret not in logs
