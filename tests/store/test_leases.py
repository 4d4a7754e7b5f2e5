"""The PostgreSQL store's leases (leases.py): admissions and settlements decided in memory from
headroom leased in the tables, a replica's journal replayed after a crash, leases of a stopped
replica freed by another's sweeper, and one limit across replicas."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from proxy.ledger import Admitted
from proxy.orgfile import parse_orgs
from proxy.settings import StoreSettings
from proxy.store import open_store
from proxy.store.batches import BatchedStore
from proxy.store.journal import read_records
from proxy.store.leases import LEASE_TTL_S
from tests.conftest import DEFAULT_ORGS, ROOT, postgres_schema
from tests.store.test_contract import NOW_S, PLANS, TIERS, alice, asking, settling

LIMIT_NANOS = 10_000_000  # the contract's tier: a session window of $0.01, worst case admitted


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with postgres_schema() as opened:
        yield opened


async def replica(url: str, journal: Path) -> BatchedStore:
    store = await open_store(StoreSettings(url=url, journal=str(journal)))
    assert isinstance(store, BatchedStore) and store.leases is not None
    await store.apply_orgs(parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", PLANS), NOW_S)
    return store


async def in_tables(url: str, sql: str) -> list[tuple]:
    """What another connection sees."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_a_lease_admits_and_settles_in_memory_and_the_tables_follow(url, tmp_path):
    store = await replica(url, tmp_path / "a.journal")
    member_id = await alice(store)
    await store.admit(asking(member_id, "first", 100_000), TIERS)  # a batch: it takes a lease
    [(lease_nanos,)] = await in_tables(url, "SELECT amount_nanos FROM leases")
    assert lease_nanos == 16 * 100_000  # 16 worst cases, less than half the headroom left

    admission = await store.admit(asking(member_id, "second", 100_000), TIERS)
    assert admission.decision == Admitted("included", 100_000)
    assert await in_tables(url, "SELECT id FROM requests WHERE id = 'second'") == []
    assert len(read_records(str(tmp_path / "a.journal"))) == 1  # on disk before admit returned
    settled = await store.settle(settling("second", 40_000), TIERS)
    assert settled is not None and settled.split.included_nanos == 40_000
    assert store.steps_leased == 2

    await store.flush()
    assert await in_tables(url, "SELECT status, cost_nanos FROM requests WHERE id = 'second'") == [
        ("posted", 40_000)
    ]
    # the lease lent 100,000 to "second" and got back what it did not cost
    assert await in_tables(url, "SELECT amount_nanos FROM leases") == [(lease_nanos - 40_000,)]
    assert await in_tables(url, "SELECT used_nanos, reserved_nanos FROM windows") == [
        (40_000, 100_000 + lease_nanos - 40_000)  # "first" in flight, and the lease
    ]
    status = await store.member_status(member_id, TIERS, NOW_S)
    assert status.windows.by_kind["session"].reserved_nanos == 100_000  # leases left out
    assert (await store.verify(NOW_S)).mismatches == ()

    await store.close()  # gives the lease back
    assert await in_tables(url, "SELECT COUNT(*) FROM leases") == [(0,)]
    assert await in_tables(url, "SELECT used_nanos, reserved_nanos FROM windows") == [
        (40_000, 100_000)
    ]


async def test_near_the_limit_every_step_is_decided_exactly(url, tmp_path):
    store = await replica(url, tmp_path / "a.journal")
    member_id = await alice(store)
    decisions = []
    for n in range(12):  # 3,000,000 each: three fit in 10,000,000, leases or not
        admission = await store.admit(asking(member_id, f"r{n}", 3_000_000), TIERS)
        decisions.append(isinstance(admission.decision, Admitted))
    assert decisions.count(True) == 3
    await store.close()


async def test_two_replicas_admitting_one_member_never_pass_the_limit(url, tmp_path):
    first = await replica(url, tmp_path / "a.journal")
    second = await replica(url, tmp_path / "b.journal")
    member_id = await alice(first)
    worst_case_nanos = 150_000

    async def ask(n: int) -> bool:
        store = (first, second)[n % 2]
        admission = await store.admit(asking(member_id, f"r{n}", worst_case_nanos), TIERS)
        return isinstance(admission.decision, Admitted)

    admitted: list[int] = []
    for n in (0, 1):  # one at a time first: each replica takes a lease of its own
        assert await ask(n)
        admitted.append(n)
    for wave in range(1, 7):  # concurrent waves, the replicas' leases taken and given back between
        decisions = await asyncio.gather(*(ask(wave * 30 + n) for n in range(30)))
        admitted += [wave * 30 + n for n, ok in enumerate(decisions) if ok]
    assert len(admitted) * worst_case_nanos <= LIMIT_NANOS
    # most of the window was used: a refusal waits only for the other replica's unused lease
    assert len(admitted) * worst_case_nanos >= LIMIT_NANOS // 2
    assert first.steps_leased > 0 and second.steps_leased > 0  # both decided some in memory
    for n in admitted:
        assert await (first, second)[n % 2].settle(settling(f"r{n}", 100_000), TIERS)
    await first.flush()
    await second.flush()
    assert (await first.verify(NOW_S)).mismatches == ()
    assert await in_tables(url, "SELECT used_nanos FROM windows") == [(len(admitted) * 100_000,)]
    await first.close()
    await second.close()
    assert await in_tables(url, "SELECT reserved_nanos FROM windows") == [(0,)]


async def crashed_replica(url: str, journal: Path, steps: str) -> None:
    """Run `steps` in a process of its own with the store opened as `store` (alice's id as
    `member_id`), then stop it as kill -9 would: nothing closed, nothing flushed."""
    script = f"""
import asyncio, os, sys
sys.path.insert(0, {str(ROOT)!r})
from proxy.settings import StoreSettings
from proxy.store import open_store
from tests.store.test_contract import TIERS, alice, asking, settling

async def main():
    store = await open_store(StoreSettings(url={url!r}, journal={str(journal)!r}))
    member_id = await alice(store)
{textwrap.indent(textwrap.dedent(steps), "    ")}
    os._exit(0)
asyncio.run(main())
"""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()


async def test_a_replica_killed_mid_load_replays_its_journal_once(url, tmp_path):
    journal = tmp_path / "a.journal"
    await (await replica(url, journal)).close()
    await crashed_replica(
        url,
        journal,
        """
        for n in range(4):
            await store.admit(asking(member_id, f"r{n}", 100_000), TIERS)
            await store.settle(settling(f"r{n}", 30_000), TIERS)
        await store.admit(asking(member_id, "in-flight", 100_000), TIERS)
        assert store.leases.records_waiting
        """,
    )
    assert len(read_records(str(journal))) >= 5
    assert await in_tables(url, "SELECT COUNT(*) FROM requests WHERE id = 'in-flight'") == [(0,)]

    store = await replica(url, journal)  # replays the journal before it serves
    statuses = dict(await in_tables(url, "SELECT id, status FROM requests"))
    assert statuses == {
        "r0": "posted",
        "r1": "posted",
        "r2": "posted",
        "r3": "posted",
        "in-flight": "pending",
    }
    [(used_nanos, reserved_nanos)] = await in_tables(
        url, "SELECT used_nanos, reserved_nanos FROM windows"
    )
    [(left_nanos,)] = await in_tables(url, "SELECT amount_nanos FROM leases")
    assert used_nanos == 120_000 and reserved_nanos == 100_000 + left_nanos
    # r0 took the lease (16 worst cases); r1 to r3 cost it 30,000 each, "in-flight" holds 100,000
    assert left_nanos == 16 * 100_000 - 3 * 30_000 - 100_000
    assert (await store.verify(NOW_S)).mismatches == ()
    await store.close()
    store = await replica(url, journal)  # nothing applies twice
    assert await in_tables(url, "SELECT used_nanos FROM windows") == [(120_000,)]
    # the journal is known by its path and an id kept beside it, whatever the host is called
    journal_id = (tmp_path / "a.journal.id").read_text().strip()
    assert await in_tables(url, "SELECT journal FROM journals_applied") == [
        (f"{journal}#{journal_id}",)
    ]
    await store.close()


async def test_a_stopped_replicas_lease_is_freed_by_another_replicas_sweeper(url, tmp_path):
    await (await replica(url, tmp_path / "a.journal")).close()
    await crashed_replica(
        url,
        tmp_path / "a.journal",
        """
        await store.admit(asking(member_id, "r0", 100_000), TIERS)
        await store.settle(settling("r0", 30_000), TIERS)
        await store.flush()
        """,
    )
    [(lease_nanos, expires_at_s)] = await in_tables(
        url, "SELECT amount_nanos, expires_at_s FROM leases"
    )
    other = await replica(url, tmp_path / "b.journal")
    await other.expire_pending(expires_at_s - 1)  # not yet
    assert await in_tables(url, "SELECT reserved_nanos FROM windows") == [(lease_nanos,)]
    await other.expire_pending(expires_at_s + LEASE_TTL_S)
    assert await in_tables(url, "SELECT COUNT(*) FROM leases") == [(0,)]
    assert await in_tables(url, "SELECT used_nanos, reserved_nanos FROM windows") == [(30_000, 0)]
    assert (await other.verify(NOW_S)).mismatches == ()
    await other.close()


async def test_records_applied_after_their_lease_was_freed_move_the_windows(url, tmp_path):
    journal = tmp_path / "a.journal"
    await (await replica(url, journal)).close()
    await crashed_replica(  # its records stay in the journal: nothing reaches the tables
        url,
        journal,
        """
        await store.admit(asking(member_id, "first", 100_000), TIERS)  # takes the lease
        await store.settle(settling("first", 30_000), TIERS)
        await store.admit(asking(member_id, "r1", 100_000), TIERS)  # from it: never suspends
        store._apply_timer.cancel()  # so no batch applies what follows
        await store.settle(settling("r1", 30_000), TIERS)
        await store.admit(asking(member_id, "in-flight", 100_000), TIERS)
        """,
    )
    [(expires_at_s,)] = await in_tables(url, "SELECT expires_at_s FROM leases")
    other = await replica(url, tmp_path / "b.journal")
    await other.expire_pending(expires_at_s + 1)  # the lease is freed before the replica is back
    assert await in_tables(url, "SELECT used_nanos, reserved_nanos FROM windows") == [(30_000, 0)]
    await other.close()

    store = await replica(url, journal)  # its records apply to windows that hold no lease now
    assert await in_tables(url, "SELECT used_nanos, reserved_nanos FROM windows") == [
        (60_000, 100_000)  # "in-flight" holds its reservation, as if it had been admitted alone
    ]
    assert (await store.verify(NOW_S)).mismatches == ()
    await store.settle(settling("in-flight", 50_000), TIERS)
    await store.flush()
    assert await in_tables(url, "SELECT used_nanos, reserved_nanos FROM windows") == [(110_000, 0)]
    await store.close()


async def test_an_admin_change_on_the_replica_gives_its_leases_back(url, tmp_path):
    store = await replica(url, tmp_path / "a.journal")
    member_id = await alice(store)
    await store.admit(asking(member_id, "first", 100_000), TIERS)
    assert await in_tables(url, "SELECT COUNT(*) FROM leases") == [(1,)]
    await store.update_org("acme", {"monthly_limit_nanos": 0})
    await store.flush()
    assert await in_tables(url, "SELECT COUNT(*) FROM leases") == [(0,)]
    await store.admit(asking(member_id, "second", 100_000), TIERS)  # decided in a batch again
    assert store.steps_leased == 0
    await store.close()


async def test_a_lease_held_between_requests_is_renewed_on_its_own(url, tmp_path):
    store = await replica(url, tmp_path / "a.journal")
    member_id = await alice(store)
    await store.admit(asking(member_id, "first", 100_000), TIERS)
    [(expires_at_s,)] = await in_tables(url, "SELECT expires_at_s FROM leases")
    await asyncio.sleep(LEASE_TTL_S / 4 + 0.5)  # no request meanwhile: a batch renews it
    [(renewed_to_s,)] = await in_tables(url, "SELECT expires_at_s FROM leases")
    assert renewed_to_s > expires_at_s
    await store.admit(asking(member_id, "later", 100_000), TIERS)
    assert store.steps_leased == 1  # still decided from the lease
    await store.close()
