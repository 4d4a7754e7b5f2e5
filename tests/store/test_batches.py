"""The PostgreSQL store's group commit (batches.py): steps that wait together commit together,
with the same books as one at a time, and a step that cannot succeed fails alone."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.auth import hash_key
from proxy.ledger import Admitted, Unaffordable, month_of
from proxy.orgfile import parse_orgs
from proxy.settings import StoreSettings
from proxy.store import open_store
from proxy.store.batches import BatchedStore
from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_ORGS, postgres_schema
from tests.store.test_contract import NOW_S, PLANS, TIERS, asking, settling


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with postgres_schema() as schema_url:
        yield schema_url


@pytest.fixture
async def store(url: str) -> AsyncIterator[BatchedStore]:
    opened = await open_store(StoreSettings(url=url))
    assert isinstance(opened, BatchedStore)
    try:
        orgs = DEFAULT_ORGS.replace(
            "credits_usd = 100", "credits_usd = 100\nmonthly_spend_limit_usd = 0.04"
        )
        await opened.apply_orgs(parse_orgs(tomllib.loads(orgs), "orgs.toml", PLANS), NOW_S)
        yield opened
    finally:
        await opened.close()


async def member(store: BatchedStore, key: str) -> int:
    seat = await store.find_seat(hash_key(key))
    assert seat is not None
    return seat.member_id


async def reserved_nanos(store: BatchedStore, member_id: int) -> int:
    status = await store.member_status(member_id, TIERS, NOW_S + 1)
    return status.windows.by_kind["session"].reserved_nanos


async def test_steps_waiting_together_commit_in_one_transaction_with_every_write(
    store: BatchedStore,
) -> None:
    """alice has windows already, bob's first admission opens his: in one batch, bob's window
    must be inserted before any update adds to it, whatever order the steps came in."""
    alice, bob = await member(store, ALICE_KEY), await member(store, BOB_KEY)
    await store.admit(asking(alice, "first", 1_000), TIERS)
    batches_before = store.batches_committed
    admissions = await asyncio.gather(
        store.admit(asking(alice, "a1", 2_000), TIERS),
        store.admit(asking(bob, "b1", 3_000), TIERS),
        store.admit(asking(alice, "a2", 4_000), TIERS),
        store.admit(asking(bob, "b2", 5_000), TIERS),
        store.settle(settling("first", 700), TIERS),
    )
    assert store.batches_committed == batches_before + 1
    assert all(isinstance(a.decision, Admitted) for a in admissions[:4])
    assert await reserved_nanos(store, alice) == 2_000 + 4_000
    assert await reserved_nanos(store, bob) == 3_000 + 5_000
    status = await store.member_status(alice, TIERS, NOW_S + 1)
    assert status.windows.by_kind["session"].used_nanos == 700
    for request_id in ("a1", "b1", "a2", "b2"):
        assert (await store.get_request(request_id)).status == "pending"
    assert (await store.get_request("first")).status == "posted"


async def test_a_step_that_cannot_succeed_fails_alone(store: BatchedStore) -> None:
    alice, bob = await member(store, ALICE_KEY), await member(store, BOB_KEY)
    no_tiers: dict = {}  # alice's tier is unknown to this step: it raises
    results = await asyncio.gather(
        store.admit(asking(bob, "b1", 3_000), TIERS),
        store.admit(asking(alice, "a1", 2_000), no_tiers),
        store.admit(asking(bob, "b2", 5_000), TIERS),
        return_exceptions=True,
    )
    assert isinstance(results[1], KeyError)
    assert isinstance(results[0].decision, Admitted) and isinstance(results[2].decision, Admitted)
    assert await reserved_nanos(store, bob) == 8_000
    assert await store.get_request("a1") is None  # nothing of the failed step went in


async def test_an_org_locked_mid_batch_is_read_again_under_its_lock(
    store: BatchedStore, url: str
) -> None:
    """Another replica spends the org's limit while alice's batch waits for the org's row: her
    extra usage is decided on what that replica committed, not on the books read before."""
    alice = await member(store, ALICE_KEY)
    await store.admit(asking(alice, "fill", 1), TIERS)
    await store.settle(settling("fill", 10_000_000), TIERS)  # her session is spent
    await store.continue_extra_usage(alice, TIERS, NOW_S)
    replica = await asyncpg.connect(url)
    try:
        transaction = replica.transaction()
        await transaction.start()
        await replica.execute("SELECT 1 FROM orgs WHERE id = 'acme' FOR UPDATE")
        waiting = asyncio.ensure_future(
            store.admit(asking(alice, "x1", 2_000_000, now_s=NOW_S + 1), TIERS)
        )
        for _ in range(200):  # until alice's batch waits for the org's row
            if await replica.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            ):
                break
            await asyncio.sleep(0.02)
        await replica.execute(  # $0.039 of the org's $0.04 spent meanwhile
            "INSERT INTO spend (org_id, member_id, month, posted_nanos) "
            "VALUES ('acme', 0, $1, 39000000) ON CONFLICT (org_id, member_id, month) "
            "DO UPDATE SET posted_nanos = spend.posted_nanos + 39000000",
            month_of(NOW_S + 1, "UTC"),
        )
        await transaction.commit()
        admission = await asyncio.wait_for(waiting, 10)
    finally:
        await replica.close()
    assert isinstance(admission.decision, Unaffordable)
    assert admission.decision.account.name == "org_monthly"
