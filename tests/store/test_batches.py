"""The PostgreSQL store's group commit (batches.py): steps that wait together commit together,
with the same books as one at a time, and a step that cannot succeed fails alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tomllib
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

import asyncpg
import pytest

from proxy.auth import hash_key
from proxy.ledger import Admitted, Unaffordable, month_of
from proxy.orgfile import parse_orgs
from proxy.settings import StoreSettings
from proxy.store import open_store
from proxy.store.batches import _BOOKS_SQL, BatchedStore, _months_around
from proxy.store.postgres import KEPT_SERVER_SETTINGS, to_dollar_params
from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_ORGS, postgres_schema
from tests.store.test_contract import NOW_S, PLANS, TIERS, asking, settling

CAROL_KEY = "sk-test-carol-000000000000000003"
DAVE_KEY = "sk-test-dave-0000000000000000004"


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
        ) + "".join(
            f'\n[[orgs.members]]\nemail = "{name}@acme.test"\nrole = "member"\n'
            f'tier = "standard"\nkey = "{key}"\n'
            for name, key in (("carol", CAROL_KEY), ("dave", DAVE_KEY))
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
    """carol's and dave's steps take the two batches that may run at once; the five steps
    that come meanwhile wait and go together into the next one. In it alice has windows
    already and bob's first admission opens his: bob's window must be inserted before any
    update adds to it, whatever order the steps came in."""
    alice, bob = await member(store, ALICE_KEY), await member(store, BOB_KEY)
    carol, dave = await member(store, CAROL_KEY), await member(store, DAVE_KEY)
    await store.admit(asking(alice, "first", 1_000), TIERS)
    batches_before = store.batches_committed
    answers = await asyncio.gather(
        store.admit(asking(carol, "c1", 1_000), TIERS),
        store.admit(asking(dave, "d1", 1_000), TIERS),
        store.admit(asking(alice, "a1", 2_000), TIERS),
        store.admit(asking(bob, "b1", 3_000), TIERS),
        store.admit(asking(alice, "a2", 4_000), TIERS),
        store.admit(asking(bob, "b2", 5_000), TIERS),
        store.settle(settling("first", 700), TIERS),
    )
    assert store.batches_committed == batches_before + 3
    assert all(isinstance(a.decision, Admitted) for a in answers[:6])
    assert await reserved_nanos(store, alice) == 2_000 + 4_000
    assert await reserved_nanos(store, bob) == 3_000 + 5_000
    status = await store.member_status(alice, TIERS, NOW_S + 1)
    assert status.windows.by_kind["session"].used_nanos == 700
    for request_id in ("a1", "b1", "a2", "b2"):
        assert (await store.get_request(request_id)).status == "pending"
    assert (await store.get_request("first")).status == "posted"


async def test_a_members_steps_wait_for_the_batch_that_has_the_member(
    store: BatchedStore, url: str
) -> None:
    """Two batches run at once only on different members. alice's first admission needs the
    org's row, which another replica holds: her batch waits. Her second admission waits for
    that batch (beside it, it would find her row held and run alone), while bob's runs."""
    alice, bob = await member(store, ALICE_KEY), await member(store, BOB_KEY)
    await spend_session(store, alice)
    steps_before = store.steps_committed
    async with org_held(url) as replica:
        first = asyncio.ensure_future(
            store.admit(asking(alice, "a1", 1_000, now_s=NOW_S + 1), TIERS)
        )
        await waiting_for(replica)
        second = asyncio.ensure_future(
            store.admit(asking(alice, "a2", 1_000, now_s=NOW_S + 1), TIERS)
        )
        beside = await asyncio.wait_for(store.admit(asking(bob, "b1", 1_000), TIERS), 10)
        assert isinstance(beside.decision, Admitted)
        assert not first.done() and not second.done()
    for admission in await asyncio.wait_for(asyncio.gather(first, second), 10):
        assert isinstance(admission.decision, Admitted)
    assert store.steps_committed == steps_before + 3  # none ran alone


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


async def test_a_batch_whose_writes_fail_on_the_server_leaves_no_trace_and_its_steps_run_alone(
    store: BatchedStore,
) -> None:
    """carol's and dave's steps take the two batches that may run at once; alice's and bob's
    go together into the next. Two admissions with one request id: the batch's writes fail on
    the server (a duplicate key), its transaction rolls back whole, and each step runs again
    alone: one of the two is admitted, the other fails, bob's other one goes in."""
    alice, bob = await member(store, ALICE_KEY), await member(store, BOB_KEY)
    carol, dave = await member(store, CAROL_KEY), await member(store, DAVE_KEY)
    alone_before = store.steps_alone
    complaints: list[str] = []  # asyncpg reports a connection reset mid-transaction here
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: complaints.append(context["message"]))
    try:
        results = await asyncio.gather(
            store.admit(asking(carol, "c1", 1_000), TIERS),
            store.admit(asking(dave, "d1", 1_000), TIERS),
            store.admit(asking(alice, "same", 2_000), TIERS),
            store.admit(asking(bob, "same", 3_000), TIERS),
            store.admit(asking(bob, "b2", 5_000), TIERS),
            return_exceptions=True,
        )
        more = await store.admit(asking(bob, "b3", 1_000), TIERS)  # its connection is usable
    finally:
        loop.set_exception_handler(None)
    assert all(isinstance(results[i].decision, Admitted) for i in (0, 1, 4))
    assert store.steps_alone == alone_before + 3
    # alone, the two run at once, each on a connection of its own: either may be first
    failed = [i for i in (2, 3) if isinstance(results[i], asyncpg.UniqueViolationError)]
    assert len(failed) == 1
    winner = alice if failed == [3] else bob
    assert (await store.get_request("same")).member_id == winner
    # nothing of the failed batch stayed: the reservations of the steps that went in, alone
    assert await reserved_nanos(store, alice) == (2_000 if winner == alice else 0)
    assert await reserved_nanos(store, bob) == 5_000 + 1_000 + (3_000 if winner == bob else 0)
    assert isinstance(more.decision, Admitted)
    assert complaints == []  # the failed batch rolled back before its connection went back


async def test_an_org_locked_mid_batch_is_read_again_under_its_lock(
    store: BatchedStore, url: str
) -> None:
    """Another replica spends the org's limit while alice's batch waits for the org's row: her
    extra usage is decided on what that replica committed, not on the books read before."""
    alice = await member(store, ALICE_KEY)
    await spend_session(store, alice)
    async with org_held(url) as replica:
        waiting = asyncio.ensure_future(
            store.admit(asking(alice, "x1", 2_000_000, now_s=NOW_S + 1), TIERS)
        )
        await waiting_for(replica)
        await replica.execute(  # $0.039 of the org's $0.04 spent meanwhile
            "INSERT INTO spend (org_id, member_id, month, posted_nanos) "
            "VALUES ('acme', 0, $1, 39000000) ON CONFLICT (org_id, member_id, month) "
            "DO UPDATE SET posted_nanos = spend.posted_nanos + 39000000",
            month_of(NOW_S + 1, "UTC"),
        )
    admission = await asyncio.wait_for(waiting, 10)
    assert isinstance(admission.decision, Unaffordable)
    assert admission.decision.account.name == "org_monthly"


async def spend_session(store: BatchedStore, member_id: int) -> None:
    """Spend the member's session and continue: their next admissions draw on extra usage."""
    await store.admit(asking(member_id, f"fill{member_id}", 1), TIERS)
    await store.settle(settling(f"fill{member_id}", 10_000_000), TIERS)
    await store.continue_extra_usage(member_id, TIERS, NOW_S)


@contextlib.asynccontextmanager
async def org_held(url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another replica's transaction holding the org's row; it commits on leaving."""
    replica = await asyncpg.connect(url)
    try:
        async with replica.transaction():
            await replica.execute("SELECT 1 FROM orgs WHERE id = 'acme' FOR UPDATE")
            yield replica
    finally:
        await replica.close()


async def waiting_for(replica: asyncpg.Connection) -> None:
    """Until a transaction waits for a lock that this connection holds."""
    for _ in range(200):
        if await replica.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
        ):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("nothing waits for the lock")


# The server's sessions opened since $1, but the one asking.
SESSIONS_SINCE = (
    "FROM pg_stat_activity WHERE datname = current_database() AND backend_type = "
    "'client backend' AND pid <> pg_backend_pid() AND backend_start >= $1"
)


async def store_backends(url: str, since: datetime) -> set[tuple[int, datetime]]:
    """The server's sessions opened since `since`, but the one asking: (pid, start)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(f"SELECT pid, backend_start {SESSIONS_SINCE}", since)
    finally:
        await conn.close()
    return {(row[0], row[1]) for row in rows}


async def test_batches_keep_their_connections_and_replace_one_the_server_closed(
    url: str,
) -> None:
    """Batches run on connections of their own, kept open between them: a second wave of
    admissions, two batches at once as in the first, reaches the server through the same
    sessions, the pool's one and the batches' two. When the server closes them, the next
    batch opens another and goes through."""
    admin = await asyncpg.connect(url)
    opened_at = await admin.fetchval("SELECT now()")
    store = await open_store(StoreSettings(url=url, pool_size=1))
    try:
        await store.apply_orgs(parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", PLANS), NOW_S)
        alice, bob = await member(store, ALICE_KEY), await member(store, BOB_KEY)

        async def wave(name: str) -> None:
            steps = [
                store.admit(asking(who, f"{name}-{who}-{n}", 1_000), TIERS)
                for n in range(10)
                for who in (alice, bob)
            ]
            assert all(isinstance(a.decision, Admitted) for a in await asyncio.gather(*steps))

        await wave("first")
        first = await store_backends(url, opened_at)
        await wave("second")
        assert await store_backends(url, opened_at) == first
        assert len(first) == 3  # the pool's one (pool_size = 1) and the batches' two

        await admin.execute(f"SELECT pg_terminate_backend(pid) {SESSIONS_SINCE}", opened_at)
        await asyncio.sleep(0.2)  # the closed connections notice
        await wave("third")
        assert not await store_backends(url, opened_at) & first
    finally:
        await store.close()
        await admin.close()


async def test_a_batch_finds_its_books_by_key_not_by_scanning(
    store: BatchedStore, url: str
) -> None:
    """The books' statement reads its rows by key, however many members the database holds,
    however many windows a member has had, and however many settled requests the "pending"
    index still lists until a vacuum (each settlement leaves one such dead entry). An earlier version read all the members, or
    every entry of that index: 2.2 ms a batch with 20,000 members. Planned as the batches'
    connections plan it: once, and kept for the connection's life, so a plan made while the
    tables were nearly empty (a new database) must not scan them once they have grown; one
    did, 2.1 ms a batch at 20,000 requests (docs/performance.md)."""
    alice, bob = await member(store, ALICE_KEY), await member(store, BOB_KEY)
    await store.admit(asking(bob, "to-settle", 1_000), TIERS)
    conn = await asyncpg.connect(url, server_settings=KEPT_SERVER_SETTINGS)
    sql = to_dollar_params(_BOOKS_SQL)
    months = ", ".join(f"'{month}'" for month in _months_around([NOW_S]))

    async def explained(name: str) -> str:
        async with conn.transaction():
            return await conn.fetchval(  # EXECUTE takes no parameters: these are ours
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}("
                f"ARRAY['to-settle'], ARRAY[{alice}]::bigint[], ARRAY[{months}])"
            )

    try:
        await conn.execute(f"PREPARE early AS {sql}")
        await explained("early")  # planned at its first run, the tables nearly empty
        await conn.execute(
            "INSERT INTO members (org_id, email, role, tier, created_at_s) "
            "SELECT 'acme', 'm' || n || '@acme.test', 'member', 'standard', 0 "
            "FROM generate_series(1, 5000) n"
        )
        await conn.execute(
            "INSERT INTO requests (id, member_id, org_id, model, stream, status, created_at_s, "
            "expires_at_s) SELECT 'old' || n, $1, 'acme', 'claude-sonnet-4-5', 0, 'pending', "
            "0, 0 FROM generate_series(1, 5000) n",
            alice,
        )
        await conn.execute("UPDATE requests SET status = 'posted' WHERE id LIKE 'old%'")
        await conn.execute(  # a long-standing member's windows: about five a day for years
            "INSERT INTO windows (member_id, kind, started_at_s, ends_at_s) "
            "SELECT $1, kind, n, n + 1 FROM generate_series(1, 2500) n, "
            "(VALUES ('session'), ('weekly')) k (kind)",
            alice,
        )
        plans = [await explained("early")]
        for analyze in ((), ("ANALYZE",)):  # planned without statistics (new tables), then with
            for statement in (*analyze, f"PREPARE books AS {sql}"):
                await conn.execute(statement)
            plans.append(await explained("books"))
            await conn.execute("DEALLOCATE books")
    finally:
        await conn.close()
    for plan in plans:
        read = [
            (node["Node Type"], node.get("Relation Name") or node.get("Index Name"), rows)
            for node in _nodes(json.loads(plan)[0]["Plan"])
            if (rows := node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) > 4
        ]
        assert read == []  # no more than alice's and bob's seats, windows and spend


def _nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def test_a_batch_reads_every_month_its_instants_fall_in_anywhere() -> None:
    """From the earliest instant's month 14 hours earlier (UTC-12 is the furthest behind) to
    the latest's 14 hours later (UTC+14), every month between included."""
    new_year_eve_8pm_utc_s = 1_798_747_200.0  # 2026-12-31T20:00:00Z: already 2027 at UTC+14
    assert _months_around([new_year_eve_8pm_utc_s]) == ["2026-12", "2027-01"]
    mid_june_s = 1_781_481_600.0  # 2026-06-15T00:00:00Z
    assert _months_around([mid_june_s, mid_june_s + 60]) == ["2026-06"]
    assert _months_around([mid_june_s, new_year_eve_8pm_utc_s]) == [
        f"2026-{month:02d}" for month in range(6, 13)
    ] + ["2027-01"]
    for at_s in (mid_june_s, new_year_eve_8pm_utc_s):  # in every zone, the month is listed
        for zone in ("Pacific/Kiritimati", "Etc/GMT+12", "Europe/Rome"):
            assert month_of(at_s, zone) in _months_around([at_s])
