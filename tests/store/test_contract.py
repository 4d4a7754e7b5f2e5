"""The Store contract: every backend must pass this suite (SQLite always; PostgreSQL joins here)."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.auth import hash_key
from proxy.ledger import EXTRA, INCLUDED, Admitted, Blocked, Unaffordable
from proxy.metering import Usage
from proxy.orgfile import parse_orgs
from proxy.settings import Plans, StoreSettings
from proxy.store import open_store
from proxy.store.base import AdmissionRequest, IdempotencyConflict, Settlement, Store
from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_ORGS, postgres_schema

PLANS = Plans.from_mapping(
    {"tiers": {"standard": {"session_included_usd": 0.01, "included_admission": "worst_case"}}},
    "plans.toml",
)
TIERS = PLANS.tiers
NOW_S = 1_767_225_600.0


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-leases"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path):
    """Open a fresh store of the parametrized backend with an orgs file applied (once a test:
    PostgreSQL gets a schema of its own for it; with a journal, it admits from leases)."""
    async with contextlib.AsyncExitStack() as stack:
        journal = ""
        if request.param.startswith("postgresql"):
            url = await stack.enter_async_context(postgres_schema())
            if request.param == "postgresql-leases":
                journal = str(tmp_path / "replica.journal")
        else:
            url = f"sqlite:///{tmp_path / 'contract.db'}"
        opened: list[Store] = []

        async def make(orgs: str = DEFAULT_ORGS) -> Store:
            assert not opened, "one store per test"
            store = await open_store(StoreSettings(url=url, journal=journal))
            opened.append(store)
            await store.apply_orgs(parse_orgs(tomllib.loads(orgs), "orgs.toml", PLANS), NOW_S)
            return store

        yield make
        for store in opened:
            await store.close()


@pytest.fixture
async def store(make_store) -> AsyncIterator[Store]:
    yield await make_store()


async def alice(store: Store) -> int:
    seat = await store.find_seat(hash_key(ALICE_KEY))
    assert seat is not None
    return seat.member_id


def asking(
    member_id: int,
    request_id: str,
    worst_case_nanos: int,
    *,
    now_s: float = NOW_S,
    continue_requested: bool = False,
) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=request_id,
        member_id=member_id,
        org_id="acme",
        model="claude-sonnet-4-5",
        stream=False,
        worst_case_nanos=worst_case_nanos,
        max_tokens=worst_case_nanos // 15_000,  # as if all of it were Sonnet 4.5 output
        output_nanos_per_token=15_000,
        continue_requested=continue_requested,
        created_at_s=now_s,
        expires_at_s=now_s + 900,
    )


def settling(request_id: str, cost_nanos: int) -> Settlement:
    return Settlement(
        request_id=request_id,
        usage=Usage(input_tokens=1),
        cost_nanos=cost_nanos,
        upstream_status=200,
        outcome="ok",
        settled_at_s=NOW_S + 1,
        upstream_ms=1.0,
        duration_ms=2.0,
    )


async def test_admit_then_settle_posts_once(store: Store) -> None:
    member_id = await alice(store)
    admission = await store.admit(asking(member_id, "r1", 1_000_000), TIERS)
    assert admission.decision == Admitted(INCLUDED, 1_000_000)
    assert (await store.get_request("r1")).status == "pending"
    assert await store.settle(settling("r1", 3_000_000), TIERS) is not None
    assert await store.settle(settling("r1", 3_000_000), TIERS) is None  # idempotent
    record = await store.get_request("r1")
    assert (record.status, record.cost_nanos, record.included_nanos) == (
        "posted",
        3_000_000,
        3_000_000,
    )
    status = await store.member_status(member_id, TIERS, NOW_S + 2)
    window = status.windows.by_kind["session"]
    assert (window.used_nanos, window.reserved_nanos) == (3_000_000, 0)


async def test_a_new_session_window_beside_a_running_weekly_one_moves_only_itself(
    store: Store,
) -> None:
    """The weekly window began with the first session window; a later session window must not
    move that first one (the windows are matched by kind as well as by start)."""
    tiers = Plans.from_mapping(
        {"tiers": {"standard": {"session_included_usd": 0.01, "weekly_included_usd": 0.05}}},
        "plans.toml",
    ).tiers
    member_id = await alice(store)
    await store.admit(asking(member_id, "early", 1_000_000), tiers)
    await store.settle(settling("early", 1_000_000), tiers)
    later_s = NOW_S + 6 * 3600  # the first session window has ended; the weekly one runs on
    await store.admit(asking(member_id, "later", 2_000_000, now_s=later_s), tiers)
    assert (await store.verify(later_s)).mismatches == ()  # each window holds its own reserve
    await store.settle(replace(settling("later", 2_000_000), settled_at_s=later_s + 1), tiers)
    async with store.database.reading() as tx:  # type: ignore[attr-defined]
        rows = await tx.fetch("SELECT kind, started_at_s, used_nanos FROM windows")
    assert sorted(tuple(row) for row in rows) == [
        ("session", NOW_S, 1_000_000),
        ("session", later_s, 2_000_000),
        ("weekly", NOW_S, 3_000_000),
    ]


async def test_concurrent_admissions_never_exceed_a_worst_case_window(store: Store) -> None:
    member_id = await alice(store)
    decisions = await asyncio.gather(
        *(store.admit(asking(member_id, f"c{i}", 3_000_000), TIERS) for i in range(40))
    )
    admitted = [d for d in decisions if isinstance(d.decision, Admitted)]
    assert len(admitted) == 3  # 3 x 3,000,000 <= 10,000,000 < 4 x 3,000,000
    assert all(isinstance(d.decision, Blocked) for d in decisions if d not in admitted)


async def test_expired_reservations_release_the_window_and_a_late_settlement_posts_once(
    store: Store,
) -> None:
    member_id = await alice(store)
    await store.admit(asking(member_id, "lost", 4_000_000), TIERS)
    assert await store.expire_pending(NOW_S + 899) == 0
    assert await store.expire_pending(NOW_S + 900) == 1
    assert (await store.get_request("lost")).status == "expired"
    status = await store.member_status(member_id, TIERS, NOW_S + 901)
    assert status.windows.by_kind["session"].reserved_nanos == 0
    # the request was alive after all (a stream longer than the TTL): it still posts, once
    assert await store.settle(settling("lost", 7), TIERS) is not None
    assert await store.settle(settling("lost", 7), TIERS) is None
    record = await store.get_request("lost")
    assert (record.status, record.cost_nanos) == ("posted", 7)
    status = await store.member_status(member_id, TIERS, NOW_S + 902)
    window = status.windows.by_kind["session"]
    assert (window.used_nanos, window.reserved_nanos) == (7, 0)


async def test_continue_records_consent_until_the_window_resets(store: Store) -> None:
    member_id = await alice(store)
    await store.admit(asking(member_id, "a", 1), TIERS)
    await store.settle(settling("a", 20_000_000), TIERS)  # exhausted
    blocked = await store.admit(asking(member_id, "b", 1, now_s=NOW_S + 5), TIERS)
    assert isinstance(blocked.decision, Blocked)
    status = await store.continue_extra_usage(member_id, TIERS, NOW_S + 6)
    assert status.member.consent_until_s == NOW_S + 5 * 3600
    again = await store.admit(asking(member_id, "c", 1, now_s=NOW_S + 7), TIERS)
    assert again.decision == Admitted(EXTRA, 0)
    await store.settle(settling("c", 5), TIERS)
    assert (await store.get_request("c")).extra_nanos == 5


async def test_revoked_keys_find_no_seat(store: Store) -> None:
    assert await store.find_seat(hash_key(ALICE_KEY)) is not None
    assert await store.revoke_key(ALICE_KEY[:12], NOW_S) == 1
    assert await store.find_seat(hash_key(ALICE_KEY)) is None


async def test_secrets_are_made_once_per_database(store: Store) -> None:
    first = await store.secret("continue_link")
    assert len(first) == 64
    assert await store.secret("continue_link") == first


async def test_purchases_are_idempotent_on_their_key(store: Store) -> None:
    first = await store.purchase("acme", 5_000_000_000, "buy-1", NOW_S)
    again = await store.purchase("acme", 5_000_000_000, "buy-1", NOW_S + 1)
    assert (first.replayed, again.replayed) == (False, True)
    assert again.transfer_id == first.transfer_id
    with pytest.raises(IdempotencyConflict):
        await store.purchase("acme", 6_000_000_000, "buy-1", NOW_S + 2)
    verification = await store.verify(NOW_S)
    assert verification.mismatches == ()


async def exhaust_session(store: Store, member_id: int) -> None:
    await store.admit(asking(member_id, "fill", 1), TIERS)
    await store.settle(settling("fill", 10_000_000), TIERS)
    await store.continue_extra_usage(member_id, TIERS, NOW_S)


async def test_parallel_extra_usage_never_exceeds_the_org_limit_or_balance(make_store) -> None:
    """200 parallel admissions against limits that fit about 20 worst cases."""
    store = await make_store(
        DEFAULT_ORGS.replace(
            "credits_usd = 100", "credits_usd = 0.05\nmonthly_spend_limit_usd = 0.04"
        )
    )
    member_id = await alice(store)
    await exhaust_session(store, member_id)
    admissions = await asyncio.gather(
        *(
            store.admit(asking(member_id, f"p{i}", 2_000_000, now_s=NOW_S + 1), TIERS)
            for i in range(200)
        )
    )
    admitted = [a for a in admissions if isinstance(a.decision, Admitted)]
    assert len(admitted) == 20  # $0.04 org limit / $0.002 worst case
    refused = {a.decision.account.name for a in admissions if isinstance(a.decision, Unaffordable)}
    assert refused == {"org_monthly"}
    # each request costs more than it reserved: the shortfall is posted as an explicit overrun
    await asyncio.gather(*(store.settle(settling(f"p{i}", 2_500_000), TIERS) for i in range(200)))
    verification = await store.verify(NOW_S + 2)
    assert verification.mismatches == () and verification.pending_reservations == 0


async def test_two_members_spending_one_org_limit_at_once_never_exceed_it(make_store) -> None:
    """alice's and bob's extra usage interleaved (on PostgreSQL, in shared batches)."""
    store = await make_store(
        DEFAULT_ORGS.replace(
            "credits_usd = 100", "credits_usd = 0.05\nmonthly_spend_limit_usd = 0.04"
        )
    )
    members = [await alice(store), (await store.find_seat(hash_key(BOB_KEY))).member_id]
    for member_id in members:
        await store.admit(asking(member_id, f"fill{member_id}", 1), TIERS)
        await store.settle(settling(f"fill{member_id}", 10_000_000), TIERS)
        await store.continue_extra_usage(member_id, TIERS, NOW_S)
    admissions = await asyncio.gather(
        *(
            store.admit(asking(members[i % 2], f"q{i}", 2_000_000, now_s=NOW_S + 1), TIERS)
            for i in range(100)
        )
    )
    admitted = [i for i, a in enumerate(admissions) if isinstance(a.decision, Admitted)]
    assert len(admitted) == 20  # $0.04 org limit / $0.002 worst case
    await asyncio.gather(*(store.settle(settling(f"q{i}", 2_000_000), TIERS) for i in range(100)))
    verification = await store.verify(NOW_S + 2)
    assert verification.mismatches == () and verification.pending_reservations == 0


async def test_exactly_one_reload_per_crossing_under_concurrent_settlements(make_store) -> None:
    store = await make_store(
        DEFAULT_ORGS.replace(
            "credits_usd = 100",
            "credits_usd = 0.1\nauto_reload = { threshold_usd = 0.05, amount_usd = 1 }",
        )
    )
    member_id = await alice(store)
    await exhaust_session(store, member_id)
    for i in range(30):
        await store.admit(asking(member_id, f"s{i}", 3_000_000, now_s=NOW_S + 1), TIERS)
    results = await asyncio.gather(
        *(store.settle(settling(f"s{i}", 3_000_000), TIERS) for i in range(30))
    )
    orders = [r.reload for r in results if r is not None and r.reload is not None]
    assert len(orders) == 1  # $0.10 - 17 x $0.003 crosses $0.05 once
    await store.finish_reload(orders[0], True, NOW_S + 3)
    await store.finish_reload(orders[0], True, NOW_S + 3)  # a retried provider call buys nothing
    assert (await store.verify(NOW_S + 4)).mismatches == ()
    funds = (await store.admit(asking(member_id, "after", 1, now_s=NOW_S + 5), TIERS)).funds
    balance = next(a for a in funds.accounts if a.name == "balance")
    assert balance.limit_nanos == 100_000_000 - 30 * 3_000_000 + 1_000_000_000


async def test_expected_reservation_reserves_recent_output_not_max_tokens(make_store) -> None:
    store = await make_store(
        DEFAULT_ORGS.replace("credits_usd = 100", 'credits_usd = 100\nreservation = "expected"')
    )
    member_id = await alice(store)
    first = await store.admit(asking(member_id, "e1", 9_000_000), TIERS)  # 600 tokens
    assert first.decision.included_reserved_nanos == 9_000_000  # no history: worst case
    settlement = settling("e1", 1_500_000)
    await store.settle(replace(settlement, usage=Usage(output_tokens=100)), TIERS)
    second = await store.admit(asking(member_id, "e2", 9_000_000, now_s=NOW_S + 1), TIERS)
    assert second.decision.included_reserved_nanos == 100 * 15_000  # the largest recent output


async def test_a_caller_cancelled_mid_transaction_leaves_the_store_usable(store: Store) -> None:
    """A client that goes away cancels its handler, possibly inside a store transaction."""
    member_id = await alice(store)
    for delay_s in (0, 0.0001, 0.0005, 0.001, 0.002):
        task = asyncio.ensure_future(store.admit(asking(member_id, f"x{delay_s}", 1), TIERS))
        await asyncio.sleep(delay_s)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    admission = await store.admit(asking(member_id, "after", 1), TIERS)
    assert isinstance(admission.decision, Admitted)
    assert await store.settle(settling("after", 1), TIERS) is not None


async def test_a_caller_cancelled_during_its_admission_still_learns_it_went_in(
    store: Store,
) -> None:
    """The handler of a client that left must still settle what its admission reserved: the
    step returns, and the cancellation lands at the caller's next await."""
    member_id = await alice(store)
    for n, delay_s in enumerate((0, 0.0001, 0.0005, 0.001, 0.002)):
        learned: list[str] = []

        async def handler(request_id: str, learned: list[str]) -> None:
            admission = await store.admit(asking(member_id, request_id, 1), TIERS)
            learned.append(type(admission.decision).__name__)
            await asyncio.sleep(1)  # the cancellation lands here

        task = asyncio.ensure_future(handler(f"k{n}", learned))
        await asyncio.sleep(delay_s)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        record = await store.get_request(f"k{n}")
        if record is None:  # cancelled before its step began: nothing went in
            assert learned == []
        else:  # it went in: the handler knew, and would settle it
            assert (learned, record.status) == (["Admitted"], "pending")
            assert await store.settle(settling(f"k{n}", 1), TIERS) is not None
    status = await store.member_status(member_id, TIERS, NOW_S + 2)
    assert status.windows.by_kind["session"].reserved_nanos == 0
