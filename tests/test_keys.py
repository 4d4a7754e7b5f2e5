"""KeyCache: seats served from memory, read again in the background, never past their TTL,
against a real SQLite store and a clock the test moves."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.auth import KeyCache, hash_key
from proxy.clock import FakeClock
from proxy.orgfile import parse_orgs
from proxy.settings import Plans, StoreSettings
from proxy.store import open_store
from proxy.store.base import Seat, Store
from proxy.tasks import Tasks
from tests.conftest import ALICE_KEY, DEFAULT_ORGS

TTL_S = 2.0
ALICE = hash_key(ALICE_KEY)
PLANS = Plans.from_mapping({"tiers": {"standard": {"session_included_usd": 1}}}, "plans.toml")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(StoreSettings(url=f"sqlite:///{tmp_path / 'keys.db'}"))
    await store.apply_orgs(parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", PLANS), 0.0)
    yield store
    await store.close()


class HeldAnswers:
    """The store's own `find_seat`, whose answers wait until `release` once `hold` is set:
    a read that began before a change and ends after it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.hold = False
        self.read_began = asyncio.Event()
        self._released = asyncio.Event()

    async def find_seat(self, key_sha256: str) -> Seat | None:
        seat = await self._store.find_seat(key_sha256)
        if self.hold:
            self.read_began.set()
            await self._released.wait()
        return seat

    def release(self) -> None:
        self._released.set()


async def test_a_seat_half_its_ttl_old_is_served_at_once_and_read_again_behind(store) -> None:
    clock, tasks = FakeClock(), Tasks()
    keys = KeyCache(store, clock, TTL_S, tasks)
    assert (await keys.seat_by_hash(ALICE)).email == "alice@acme.test"
    await store.revoke_key(ALICE, clock.now_s())  # on another replica: nothing tells us

    clock.advance(0.9)
    assert await keys.seat_by_hash(ALICE) is not None  # cached, and young: no read
    assert tasks.pending == 0

    clock.advance(0.2)  # 1.1 s old: served as it is, and read again in the background
    assert await keys.seat_by_hash(ALICE) is not None
    assert await keys.seat_by_hash(ALICE) is not None  # one read again at a time
    assert tasks.pending == 1
    await tasks.drain()
    assert await keys.seat_by_hash(ALICE) is None  # that read saw the revocation


async def test_a_seat_is_never_served_past_its_ttl(store) -> None:
    clock = FakeClock()
    keys = KeyCache(store, clock, TTL_S, Tasks())
    assert await keys.seat_by_hash(ALICE) is not None
    await store.revoke_key(ALICE, clock.now_s())
    clock.advance(TTL_S)  # no request in between, so no read in the background either
    assert await keys.seat_by_hash(ALICE) is None


async def test_a_read_under_way_when_the_cache_is_forgotten_caches_nothing(store) -> None:
    clock, tasks = FakeClock(), Tasks()
    held = HeldAnswers(store)
    keys = KeyCache(held, clock, TTL_S, tasks)  # type: ignore[arg-type]
    assert await keys.seat_by_hash(ALICE) is not None
    clock.advance(1.5)
    held.hold = True
    assert await keys.seat_by_hash(ALICE) is not None  # its read again begins, and is held
    await held.read_began.wait()

    await store.revoke_key(ALICE, clock.now_s())  # through this process, as the admin API does
    keys.forget()
    held.release()  # the read that began before the revocation ends after it
    await tasks.drain()

    held.hold = False
    assert await keys.seat_by_hash(ALICE) is None


async def test_with_no_ttl_every_lookup_reads_the_store(store) -> None:
    clock = FakeClock()
    keys = KeyCache(store, clock, 0.0, Tasks())
    assert await keys.seat_by_hash(ALICE) is not None
    await store.revoke_key(ALICE, clock.now_s())
    assert await keys.seat_by_hash(ALICE) is None
