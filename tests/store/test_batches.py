"""The PostgreSQL store's group commit (batches.py): steps that wait together commit together,
with the same books as one at a time, and a step that cannot succeed fails alone."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator

import pytest

from proxy.auth import hash_key
from proxy.ledger import Admitted
from proxy.orgfile import parse_orgs
from proxy.settings import StoreSettings
from proxy.store import open_store
from proxy.store.batches import BatchedStore
from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_ORGS, postgres_schema
from tests.store.test_contract import NOW_S, PLANS, TIERS, asking, settling


@pytest.fixture
async def store() -> AsyncIterator[BatchedStore]:
    async with postgres_schema() as url:
        opened = await open_store(StoreSettings(url=url))
        assert isinstance(opened, BatchedStore)
        try:
            await opened.apply_orgs(
                parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", PLANS), NOW_S
            )
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
