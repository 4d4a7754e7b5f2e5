"""The business steps of the Store contract in SQL, shared by SQLite and PostgreSQL.

Each public method that writes is one transaction (`async with self._db.transaction()`). A step
on a member's windows first locks the member's row; a step on the org's money (extra usage,
balance, reloads, purchases) locks the org's row too, member before org. PostgreSQL takes row
locks (`SELECT ... FOR UPDATE`), so members of one org spending included quota do not wait for
each other; SQLite holds its one write lock (BEGIN IMMEDIATE) already. Under the locks, each
statement sees what other transactions committed, so check-and-act is never a read-then-write
across a gap. The backends differ only in connections, placeholders and a few
SQL fragments (`Database` below); the SQL here runs on both.

Admission and settlement read and write through the methods under "reads" and "writes" below,
and open their transaction with `_step()`: on SQLite, `Books` (books.py) answers those reads
from memory and turns the writes into a record of its write-behind journal; on PostgreSQL, the
steps that wait together run in one transaction (batches.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, Protocol, TypeVar

import structlog

from proxy import ledger
from proxy.alerts import Alert
from proxy.ledger import (
    BALANCE,
    EXTRA,
    MEMBER_MONTHLY,
    ORG_MONTHLY,
    PREPAID_PLANS,
    RECENT_REQUESTS,
    TIER_MONTHLY,
    Account,
    Admitted,
    Blocked,
    ExtraFunds,
    MemberState,
    Months,
    ReloadOrder,
    Split,
    Unaffordable,
    Window,
    Windows,
    current_windows,
    expected_reservation_nanos,
    extra_to_reserve,
    month_of,
    reload_due,
    short_account,
    split_charge,
    with_limits,
)
from proxy.metering import Usage
from proxy.settings import Tier
from proxy.store.base import (
    MEMBER_COLUMNS,
    ORG_COLUMNS,
    Admission,
    AdmissionRequest,
    IdempotencyConflict,
    MemberStatus,
    MemberView,
    OrgSpec,
    OrgView,
    Purchase,
    RequestRecord,
    Seat,
    Settled,
    Settlement,
    Statement,
    Transfer,
    UsageRow,
    Verification,
)

log = structlog.get_logger("proxy.store")

P = ParamSpec("P")
R = TypeVar("R")

# Transactions that lost a serialization race or a deadlock run again, this many times at most.
RETRIES_MAX = 5


class Tx(Protocol):
    """One transaction (or one read) on a connection; `?` placeholders, positional params."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; how many rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any | None: ...

    async def lock_org(self, org_id: str) -> bool:
        """Hold the org until the transaction ends: its money steps run one at a time. True
        when the lock was taken just now, so what the transaction read before may be stale."""
        ...

    async def lock_named(self, name: str) -> None:
        """Hold a named lock until the transaction ends (e.g. applying orgs.toml)."""
        ...


class Database(Protocol):
    """A backend: connections, transactions and the SQL fragments that differ."""

    # True when a transaction's statements await the network (PostgreSQL): a caller cancelled
    # there must not leave it half-run, so steps run `to_its_end`. SQLite's statements run on the
    # loop's thread without yielding: nothing can cancel a step half-way (and its wait for the
    # group commit delivers a cancellation only after it returned, sqlite.py).
    yields_mid_transaction: bool

    # SQL for the start of the slice of `slice_s` seconds that an instant falls in, with the
    # placeholders named {instant} and {slice_s}
    slice_start_sql: str

    def transaction(self) -> AbstractAsyncContextManager[Tx]: ...

    def for_update(self, tables: str) -> str:
        """The clause that locks the rows of `tables` that a SELECT reads (PostgreSQL), or ""
        where the transaction holds the database's write lock already (SQLite)."""
        ...

    def reading(self) -> AbstractAsyncContextManager[Tx]:
        """A connection for reads outside a transaction."""
        ...

    def retryable(self, exc: BaseException) -> bool:
        """A transaction that failed this way did nothing and may simply run again."""
        ...

    async def columns(self, table: str) -> list[str]: ...

    async def after_copy(self, tx: Tx) -> None:
        """After rows were copied in with their ids: make new ids start past them."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


# The member and org rows that admission, settlement and status decide on: one statement.
_SEAT_COLUMNS = """m.id, m.tier, m.email, o.extra_usage = 'all' OR (o.extra_usage = 'selected'
    AND m.extra_usage_enabled = 1), m.extra_usage_consent, m.consent_until_s, o.id, o.plan,
    o.timezone, o.monthly_limit_nanos, m.monthly_limit_nanos, tl.monthly_limit_nanos,
    o.balance_nanos, o.balance_reserved_nanos, o.reservation, o.reload_threshold_nanos,
    o.reload_amount_nanos, o.reload_pending, o.webhook_url, o.webhook_secret_env"""
_SEAT_JOINS = (
    "JOIN orgs o ON o.id = m.org_id "
    "LEFT JOIN tier_limits tl ON tl.org_id = o.id AND tl.tier = m.tier"
)


@dataclass(frozen=True, slots=True)
class _SeatRow:
    member_id: int
    tier: str
    email: str
    extra_usage_enabled: bool
    consent: str
    consent_until_s: float | None
    org_id: str
    plan: str
    timezone: str
    org_limit_nanos: int | None
    member_limit_nanos: int | None
    tier_limit_nanos: int | None
    balance_nanos: int
    balance_reserved_nanos: int
    reservation: str
    reload_threshold_nanos: int | None
    reload_amount_nanos: int | None
    reload_pending: int
    webhook_url: str | None
    webhook_secret_env: str | None

    @property
    def member(self) -> MemberState:
        return MemberState(bool(self.extra_usage_enabled), self.consent, self.consent_until_s)


Starts = tuple[float | None, float | None]  # when a request's session and weekly windows began
# The member's windows that began at `starts`, each of its own kind, found by its key; its
# parameters are `windows_at(member_id, starts)`. By kind: a new session window may begin while
# the weekly window that began with an earlier session window runs on, and `started_at_s IN
# (?, ?)` would also find that earlier session window. The member named on each side: else
# SQLite's planner reads all the member's windows (about five a day) and filters them.
WINDOWS_AT = (
    "(member_id = ? AND kind = 'session' AND started_at_s = ? "
    "OR member_id = ? AND kind = 'weekly' AND started_at_s = ?)"
)
_WINDOW_ROW = "'window', kind, started_at_s, ends_at_s, used_nanos, reserved_nanos"
# The member's newest window of each kind, each found at the end of the key (parameters: the
# member's id twice), not by reading all of the member's windows.
_NEWEST_WINDOWS = " UNION ALL ".join(
    f"SELECT * FROM (SELECT {_WINDOW_ROW} FROM windows WHERE member_id = ? AND kind = '{kind}' "
    f"ORDER BY started_at_s DESC LIMIT 1) AS newest_{kind}"
    for kind in (ledger.SESSION, ledger.WEEKLY)
)

MOVE_WINDOWS_SQL = (
    "UPDATE windows SET used_nanos = used_nanos + ?, reserved_nanos = reserved_nanos + ? "
    f"WHERE {WINDOWS_AT}"
)


def windows_at(member_id: int, starts: Starts) -> tuple[int, float | None, int, float | None]:
    """The parameters of WINDOWS_AT."""
    return (member_id, starts[0], member_id, starts[1])


Spent = dict[int, tuple[int, int]]  # org (0) or member id -> the month's (posted, reserved)


@dataclass(slots=True)  # built for every request: not frozen (ledger.py says why)
class Pending:
    """What admission recorded of a request, for its settlement."""

    member_id: int
    model: str
    billing: str
    reserved_nanos: int  # included quota held in the windows
    extra_reserved_nanos: int  # held in the month's extra usage (and the prepaid balance)
    month: str
    session_started_at_s: float | None
    weekly_started_at_s: float | None


async def to_its_end(step: Awaitable[R]) -> R:
    """Await a store step that must not stop half-way. A caller cancelled meanwhile (its client
    left) still gets the step's answer, since an admission that went in must be settled, and the
    cancellation lands at the caller's next await."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        # What asyncio.wait([task]) does, without its sets and timeout (a third of its cost,
        # twice a request on PostgreSQL): only the caller's cancellation reaches `woken`.
        woken = asyncio.get_running_loop().create_future()
        wake = functools.partial(_wake, woken)
        task.add_done_callback(wake)
        try:
            await woken
        except asyncio.CancelledError:
            cancelled = True
        finally:
            task.remove_done_callback(wake)
    if cancelled:
        caller = asyncio.current_task()
        assert caller is not None
        caller.cancel()
    return task.result()


def _wake(woken: asyncio.Future[None], _: object) -> None:
    if not woken.done():
        woken.set_result(None)


def _atomic(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Run a transaction to its end even when the caller is cancelled (a client that goes away
    cancels its handler: a half-run transaction must not stay open on a shared connection, and
    the caller must learn what it did: `to_its_end`), and run it again when the backend says it
    lost a race (serialization failure, deadlock)."""

    @functools.wraps(method)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        store: SqlStore = args[0]  # type: ignore[assignment]
        if not store._db.yields_mid_transaction:
            return await method(*args, **kwargs)  # no task to shield it in: nothing to cancel
        for attempt in range(1, RETRIES_MAX + 1):
            try:
                return await to_its_end(method(*args, **kwargs))
            except Exception as exc:
                if attempt == RETRIES_MAX or not store._db.retryable(exc):
                    raise
                log.info("transaction_retried", step=method.__name__, attempt=attempt)
                await asyncio.sleep(0.001 * 2**attempt)
        raise AssertionError("unreachable")

    return run


class SqlStore:
    """The Store contract over a `Database` (sqlite.py, postgres.py open one)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._months = Months()

    @property
    def database(self) -> Database:
        """The backend itself, for whole-store operations (store/move.py)."""
        return self._db

    async def find_seat(self, key_sha256: str) -> Seat | None:
        rows = await self._read(
            """SELECT m.id, m.org_id, m.email, m.role, m.tier, o.plan, o.timezone
               FROM keys k JOIN members m ON m.id = k.member_id JOIN orgs o ON o.id = m.org_id
               WHERE k.key_sha256 = ? AND k.revoked_at_s IS NULL AND m.removed = 0""",
            (key_sha256,),
        )
        return Seat(*rows[0]) if rows else None

    @_atomic
    async def admit(self, request: AdmissionRequest, tiers: Mapping[str, Tier]) -> Admission:
        r = request
        async with self._step() as db:
            seat = await self._seat(db, r.member_id, lock="m")
            tier, member = tiers[seat.tier], seat.member
            stored, funds = await self._books(db, seat, r.created_at_s)
            windows = current_windows(tier, stored, r.created_at_s)
            amount_nanos = await self._reservation(db, r, funds.reservation)
            decision: Admitted | Blocked | Unaffordable = ledger.admit(
                windows,
                tier,
                amount_nanos,
                member,
                continue_requested=r.continue_requested,
                now_s=r.created_at_s,
            )
            extra_nanos = 0
            if isinstance(decision, Admitted):
                extra_nanos = extra_to_reserve(
                    decision, windows, amount_nanos, member, r.created_at_s
                )
                if extra_nanos and await db.lock_org(r.org_id):  # money: read it under the lock
                    seat = await self._seat(db, r.member_id)
                    funds = (await self._books(db, seat, r.created_at_s))[1]
                short = short_account(list(funds.accounts), extra_nanos) if extra_nanos else None
                if short is not None:
                    decision = Unaffordable(short, extra_nanos)
            if isinstance(decision, Admitted):
                await self._open(db, r.member_id, windows)
                starts = _starts(windows)
                await self._move_windows(
                    db, r.member_id, starts, 0, decision.included_reserved_nanos
                )
                if decision.consent_until_s is not None:
                    await self._set_consent(db, r.member_id, decision.consent_until_s)
                    member = replace(member, consent_until_s=decision.consent_until_s)
                if extra_nanos:
                    await self._move_spend(db, r.org_id, r.member_id, funds.month, 0, extra_nanos)
                    if funds.prepaid:
                        await self._move_balance(db, r.org_id, 0, extra_nanos)
                await self._record_admission(
                    db,
                    r,
                    Pending(
                        r.member_id,
                        r.model,
                        decision.billing,
                        decision.included_reserved_nanos,
                        extra_nanos,
                        funds.month,
                        *starts,
                    ),
                )
            return Admission(decision, windows, member, funds)

    async def _reservation(self, db: Tx, r: AdmissionRequest, mode: str) -> int:
        """What to reserve: the worst case, or the org's `expected` estimate."""
        if mode != "expected":
            return r.worst_case_nanos
        recent = await db.fetch(
            "SELECT output_tokens FROM requests WHERE member_id = ? AND model = ? AND "
            "status = 'posted' ORDER BY created_at_s DESC LIMIT ?",
            (r.member_id, r.model, RECENT_REQUESTS),
        )
        return expected_reservation_nanos(
            r.worst_case_nanos, r.max_tokens, r.output_nanos_per_token, [row[0] for row in recent]
        )

    @_atomic
    async def settle(self, settlement: Settlement, tiers: Mapping[str, Tier]) -> Settled | None:
        s = settlement
        async with self._step() as db:
            found = await self._settling(db, s.request_id)
            if found is None:  # settled already
                return None
            p, status, seat = found
            member_id, org_id = p.member_id, seat.org_id
            reserved_nanos, extra_reserved_nanos = p.reserved_nanos, p.extra_reserved_nanos
            if (p.billing == EXTRA or extra_reserved_nanos) and await db.lock_org(org_id):
                seat = await self._seat(db, member_id)  # money, locked
            if status == "expired":  # a long stream outlived its reservation: post it late;
                reserved_nanos = extra_reserved_nanos = 0  # the expiry already released them
            starts = (p.session_started_at_s, p.weekly_started_at_s)
            stored, funds_before = await self._books(db, seat, s.settled_at_s, starts)
            windows = with_limits(tiers[seat.tier], stored)
            split = split_charge(s.cost_nanos, windows, p.billing)
            await self._move_windows(
                db, member_id, starts, split.included_nanos + split.overrun_nanos, -reserved_nanos
            )
            reload = await self._post_extra(
                db, seat, p.month, p.model, s, split.extra_nanos, extra_reserved_nanos
            )
            await self._record_settlement(db, s, split)
            return Settled(
                org_id,
                member_id,
                split,
                windows,
                reload,
                request_id=s.request_id,
                member_email=seat.email,
                funds_before=funds_before,
                balance_after_nanos=(
                    seat.balance_nanos - split.extra_nanos if funds_before.prepaid else None
                ),
                reload_threshold_nanos=seat.reload_threshold_nanos,
                webhook=(seat.webhook_url, seat.webhook_secret_env or "")
                if seat.webhook_url
                else None,
            )

    async def _record_settlement(self, db: Tx, s: Settlement, split: Split) -> None:
        """The request's row, posted (or voided) with what it cost and how the charge split."""
        usage = s.usage or Usage()
        await db.execute(
            """UPDATE requests SET status = ?, input_tokens = ?, output_tokens = ?,
                   cache_creation_5m_input_tokens = ?, cache_creation_1h_input_tokens = ?,
                   cache_read_input_tokens = ?, web_search_requests = ?, speed = ?,
                   output_estimated = ?, cost_nanos = ?, included_nanos = ?, extra_nanos = ?,
                   overrun_nanos = ?, upstream_status = ?, outcome = ?, settled_at_s = ?,
                   upstream_ms = ?, duration_ms = ?
               WHERE id = ?""",
            (
                "posted" if s.usage is not None else "voided",
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_creation_5m_input_tokens,
                usage.cache_creation_1h_input_tokens,
                usage.cache_read_input_tokens,
                usage.web_search_requests,
                usage.speed,
                int(usage.output_estimated),
                s.cost_nanos,
                split.included_nanos,
                split.extra_nanos,
                split.overrun_nanos,
                s.upstream_status,
                s.outcome,
                s.settled_at_s,
                s.upstream_ms,
                s.duration_ms,
                s.request_id,
            ),
        )

    async def _post_extra(
        self,
        db: Tx,
        seat: _SeatRow,
        month: str,
        model: str,
        s: Settlement,
        extra_nanos: int,
        extra_reserved_nanos: int,
    ) -> ReloadOrder | None:
        """Replace the extra-usage reservation by the actual extra charge; order a reload when
        the prepaid balance crosses its threshold (one order per crossing: reload_pending)."""
        if not extra_nanos and not extra_reserved_nanos:
            return None
        org_id, member_id = seat.org_id, seat.member_id
        await self._move_spend(db, org_id, member_id, month, extra_nanos, -extra_reserved_nanos)
        within_nanos = min(extra_nanos, extra_reserved_nanos)
        await db.executemany(
            "INSERT INTO transfers (org_id, member_id, kind, amount_nanos, month, "
            "request_id, model, created_at_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (org_id, member_id, kind, -amount_nanos, month, s.request_id, model, s.settled_at_s)
                for kind, amount_nanos in (
                    ("usage_extra", within_nanos),
                    ("estimate_overrun", extra_nanos - within_nanos),
                )
                if amount_nanos
            ],
        )
        if seat.plan not in PREPAID_PLANS:
            return None
        after_nanos = seat.balance_nanos - extra_nanos
        order = await self._reload_order(db, seat, month, after_nanos, s.request_id)
        await self._move_balance(
            db,
            org_id,
            extra_nanos,
            -extra_reserved_nanos,
            reload_pending=order is not None or bool(seat.reload_pending),
        )
        return order

    @staticmethod
    async def _reload_order(
        db: Tx, seat: _SeatRow, month: str, after_nanos: int, request_id: str
    ) -> ReloadOrder | None:
        """A reload when the balance falls to its threshold and none is pending already."""
        threshold_nanos, amount_nanos = seat.reload_threshold_nanos, seat.reload_amount_nanos
        if threshold_nanos is None or not amount_nanos or seat.reload_pending:
            return None
        if not reload_due(seat.balance_nanos, after_nanos, threshold_nanos):
            return None
        if seat.org_limit_nanos is not None:
            # never reload beyond the monthly spend limit: reloads this month stay within it
            reloaded = await db.fetchrow(
                "SELECT CAST(COALESCE(SUM(amount_nanos), 0) AS BIGINT) FROM transfers "
                "WHERE org_id = ? AND month = ? AND kind = 'reload'",
                (seat.org_id, month),
            )
            if reloaded[0] + amount_nanos > seat.org_limit_nanos:
                return None
        return ReloadOrder(seat.org_id, amount_nanos, f"reload:{request_id}")

    async def _move_spend(
        self,
        db: Tx,
        org_id: str,
        member_id: int,
        month: str,
        posted_nanos: int,
        reserved_nanos: int,
    ) -> None:
        """Add to month-to-date extra usage of the org (member 0) and of the member."""
        await db.execute(
            "INSERT INTO spend (org_id, member_id, month, posted_nanos, reserved_nanos) "
            "VALUES (?, 0, ?, ?, ?), (?, ?, ?, ?, ?) ON CONFLICT (org_id, member_id, month) "
            "DO UPDATE SET posted_nanos = spend.posted_nanos + excluded.posted_nanos, "
            "reserved_nanos = spend.reserved_nanos + excluded.reserved_nanos",
            (
                org_id,
                month,
                posted_nanos,
                reserved_nanos,
                org_id,
                member_id,
                month,
                posted_nanos,
                reserved_nanos,
            ),
        )

    async def _seat(self, db: Tx, member_id: int, *, lock: str | None = None) -> _SeatRow:
        """The member and org rows a step decides on; `lock` names the rows to lock (PostgreSQL)."""
        row = await db.fetchrow(
            f"SELECT {_SEAT_COLUMNS} FROM members m {_SEAT_JOINS} WHERE m.id = ?"
            + (self._db.for_update(lock) if lock else ""),
            (member_id,),
        )
        return _SeatRow(*row)

    async def _books(
        self, db: Tx, seat: _SeatRow, now_s: float, starts: Starts | None = None
    ) -> tuple[dict[str, Window], ExtraFunds]:
        """The member's windows (the newest of each kind, or the ones that began at `starts`)
        and what extra usage can draw on this month."""
        month = self._months.of(now_s, seat.timezone)
        windows, spent = await self._stored(db, seat, month, starts)
        return windows, _funds(seat, month, spent)

    async def _stored(
        self, db: Tx, seat: _SeatRow, month: str, starts: Starts | None
    ) -> tuple[dict[str, Window], Spent]:
        """In one query: the member's windows (the newest of each kind, or the ones that began
        at `starts`) and the month's extra usage of the org (0) and the member, as (posted,
        reserved)."""
        if starts is None:
            windows_sql, params = _NEWEST_WINDOWS, (seat.member_id, seat.member_id)
        else:
            windows_sql = f"SELECT {_WINDOW_ROW} FROM windows WHERE {WINDOWS_AT}"
            params = windows_at(seat.member_id, starts)
        rows = await db.fetch(
            f"{windows_sql} UNION ALL "
            "SELECT 'spend', CAST(member_id AS TEXT), NULL, NULL, posted_nanos, reserved_nanos "
            "FROM spend WHERE org_id = ? AND month = ? AND member_id IN (0, ?)",
            (*params, seat.org_id, month, seat.member_id),
        )
        # limit_nanos is not stored: the tier of the day supplies it (current_windows)
        windows = {
            kind: Window(kind, started, ends, limit_nanos=0, used_nanos=used, reserved_nanos=held)
            for what, kind, started, ends, used, held in rows
            if what == "window"
        }
        spent = {
            int(who): (posted, held) for what, who, _, _, posted, held in rows if what == "spend"
        }
        return windows, {who: spent.get(who, (0, 0)) for who in (0, seat.member_id)}

    @_atomic
    async def purchase(
        self, org_id: str, amount_nanos: int, idempotency_key: str, now_s: float
    ) -> Purchase:
        async with self._db.transaction() as db:
            await db.lock_org(org_id)
            return await self._purchase(
                db, org_id, amount_nanos, idempotency_key, now_s, "purchase"
            )

    async def _purchase(
        self,
        db: Tx,
        org_id: str,
        amount_nanos: int,
        idempotency_key: str,
        now_s: float,
        kind: str,
    ) -> Purchase:
        if amount_nanos <= 0:
            raise ValueError("a purchase must be a positive amount")
        first = await db.fetchrow(
            "SELECT id, amount_nanos FROM transfers WHERE org_id = ? AND idempotency_key = ?",
            (org_id, idempotency_key),
        )
        if first is not None:
            if first[1] != amount_nanos:
                raise IdempotencyConflict(idempotency_key, first[1])
            return Purchase(first[0], amount_nanos, replayed=True)
        timezone = (await db.fetchrow("SELECT timezone FROM orgs WHERE id = ?", (org_id,)))[0]
        created = await db.fetchrow(
            "INSERT INTO transfers (org_id, kind, amount_nanos, month, idempotency_key, "
            "created_at_s) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (org_id, kind, amount_nanos, month_of(now_s, timezone), idempotency_key, now_s),
        )
        await db.execute(
            "UPDATE orgs SET balance_nanos = balance_nanos + ? WHERE id = ?", (amount_nanos, org_id)
        )
        return Purchase(created[0], amount_nanos, replayed=False)

    @_atomic
    async def finish_reload(self, order: ReloadOrder, paid: bool, now_s: float) -> None:
        async with self._db.transaction() as db:
            await db.lock_org(order.org_id)
            if paid:
                await self._purchase(
                    db, order.org_id, order.amount_nanos, order.idempotency_key, now_s, "reload"
                )
            await db.execute("UPDATE orgs SET reload_pending = 0 WHERE id = ?", (order.org_id,))

    async def verify(self, now_s: float) -> Verification:
        """Recompute balances and month spend from transfers, and what each window holds in
        reserve from the requests in flight and the leases (PostgreSQL's); count stale
        reservations."""
        rows = await self._read(
            """SELECT o.id, o.balance_nanos, CAST(COALESCE(SUM(t.amount_nanos), 0) AS BIGINT)
               FROM orgs o LEFT JOIN transfers t ON t.org_id = o.id
               WHERE o.plan IN ('team', 'max') GROUP BY o.id"""
        )
        mismatches = [
            f"{org}: balance {stored} != transfers {summed}"
            for org, stored, summed in rows
            if stored != summed
        ]
        rows = await self._read(
            """SELECT s.org_id, s.month, s.posted_nanos, CAST(COALESCE((SELECT -SUM(amount_nanos)
                   FROM transfers t WHERE t.org_id = s.org_id AND t.month = s.month
                   AND t.kind IN ('usage_extra', 'estimate_overrun')), 0) AS BIGINT)
               FROM spend s WHERE s.member_id = 0"""
        )
        mismatches += [
            f"{org} {month}: spend {stored} != transfers {summed}"
            for org, month, stored, summed in rows
            if stored != summed
        ]
        rows = await self._read(
            f"""SELECT w.member_id, w.kind, w.started_at_s, w.reserved_nanos, CAST(
                   (SELECT COALESCE(SUM(r.reserved_nanos), 0) FROM requests r
                    WHERE r.member_id = w.member_id AND r.status = 'pending'
                    AND {_started_of("r")} = w.started_at_s)
                   + (SELECT COALESCE(SUM(l.amount_nanos), 0) FROM leases l
                    WHERE l.member_id = w.member_id AND {_started_of("l")} = w.started_at_s)
                   AS BIGINT)
               FROM windows w"""
        )
        mismatches += [
            f"member {member} {kind} window of {started:.0f}: reserved {stored} != "
            f"in flight and leased {summed}"
            for member, kind, started, stored, summed in rows
            if stored != summed
        ]
        stale = await self._read(
            "SELECT COUNT(*) FROM requests WHERE status = 'pending' AND expires_at_s <= ?",
            (now_s,),
        )
        return Verification(pending_reservations=stale[0][0], mismatches=tuple(mismatches))

    async def list_transfers(self, org_id: str, month: str | None = None) -> list[Transfer]:
        rows = await self._read(
            "SELECT kind, amount_nanos, month, member_id, request_id, model, created_at_s "
            "FROM transfers WHERE org_id = ? AND (CAST(? AS TEXT) IS NULL OR month = ?) ORDER BY id",
            (org_id, month, month),
        )
        return [Transfer(*row) for row in rows]

    async def statement(self, org_id: str, month: str) -> Statement:
        rows = await self._read(
            """SELECT COALESCE(m.email, ''), t.model, t.kind, CAST(SUM(t.amount_nanos) AS BIGINT)
               FROM transfers t LEFT JOIN members m ON m.id = t.member_id
               WHERE t.org_id = ? AND t.month = ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
            (org_id, month),
        )
        plan = await self._read("SELECT plan FROM orgs WHERE id = ?", (org_id,))
        usage: dict[tuple[str, str], int] = {}
        credits: dict[str, int] = {}
        for email, model, kind, amount_nanos in rows:
            if kind in ("usage_extra", "estimate_overrun"):
                usage[(email, model)] = usage.get((email, model), 0) - amount_nanos
            else:
                credits[kind] = credits.get(kind, 0) + amount_nanos
        return Statement(org_id, month, plan[0][0] if plan else "", usage, credits)

    async def usage_report(
        self, org_id: str, start_s: float, end_s: float, slice_s: int | None = None
    ) -> list[UsageRow]:
        # through members: each member's requests are found by (member_id, created_at_s)
        sums = ", ".join(
            f"CAST(SUM(r.{column}) AS BIGINT)"
            for column in (
                "input_tokens",
                "output_tokens",
                "cache_creation_5m_input_tokens",
                "cache_creation_1h_input_tokens",
                "cache_read_input_tokens",
                "cost_nanos",
                "included_nanos",
                "extra_nanos",
                "overrun_nanos",
            )
        )
        slice_start = self._db.slice_start_sql.format(instant="r.created_at_s", slice_s="?4")
        rows = await self._read(
            f"""SELECT m.email, r.model, COALESCE({slice_start}, ?2), COUNT(*), {sums}
               FROM members m JOIN requests r ON r.member_id = m.id
               WHERE m.org_id = ?1 AND r.created_at_s >= ?2 AND r.created_at_s < ?3
                   AND r.status = 'posted'
               GROUP BY 1, 2, 3 ORDER BY 3, 1, 2""",
            (org_id, start_s, end_s, slice_s),
        )
        return [UsageRow(*row) for row in rows]

    @_atomic
    async def record_alert(self, alert: Alert) -> bool:
        org_id, member_email, kind, threshold_pct, period = alert.key
        async with self._db.transaction() as db:
            changed = await db.execute(
                "INSERT INTO alerts (org_id, member_email, kind, threshold_pct, period, payload, "
                "created_at_s) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    org_id,
                    member_email,
                    kind,
                    threshold_pct,
                    period,
                    json.dumps(alert.payload(), sort_keys=True),
                    alert.at_s,
                ),
            )
            return changed == 1

    async def list_alerts(self, org_id: str) -> list[dict]:
        rows = await self._read(
            "SELECT payload FROM alerts WHERE org_id = ? ORDER BY created_at_s, rowid", (org_id,)
        )
        return [json.loads(row[0]) for row in rows]

    @_atomic
    async def expire_pending(self, now_s: float) -> int:
        """The recovery rule for reservations no process settled (a crash): release them and
        charge nothing, since what upstream produced died with the process, and billing the
        worst case would bill members for the proxy's crash. The record stays, `expired`, with
        its reservation; if the process was alive after all, its settlement still posts, once."""
        due = (
            "SELECT id, member_id, org_id, reserved_nanos, extra_reserved_nanos, month, "
            "session_started_at_s, weekly_started_at_s FROM requests "
            "WHERE status = 'pending' AND expires_at_s <= ?"
        )
        rows = await self._read(due, (now_s,))
        if not rows:  # a read, not a step: the SQLite store's books in memory stay valid
            return 0
        async with self._db.transaction() as db:
            for org_id in sorted({row[2] for row in rows}):  # one order: no deadlock
                await db.lock_org(org_id)
            rows = await db.fetch(due, (now_s,))  # what another sweeper left, under the locks
            for (
                request_id,
                member_id,
                org_id,
                reserved_nanos,
                extra_reserved_nanos,
                month,
                session_start,
                weekly_start,
            ) in rows:
                await self._move_windows(
                    db, member_id, (session_start, weekly_start), 0, -reserved_nanos
                )
                if extra_reserved_nanos:
                    await self._move_spend(db, org_id, member_id, month, 0, -extra_reserved_nanos)
                    await db.execute(
                        "UPDATE orgs SET balance_reserved_nanos = balance_reserved_nanos - ? "
                        "WHERE id = ? AND plan IN ('team', 'max')",
                        (extra_reserved_nanos, org_id),
                    )
                await db.execute(
                    "UPDATE requests SET status = 'expired', outcome = 'expired', "
                    "settled_at_s = ? WHERE id = ?",
                    (now_s, request_id),
                )
            return len(rows)

    async def member_status(
        self, member_id: int, tiers: Mapping[str, Tier], now_s: float
    ) -> MemberStatus:
        async with self._db.transaction() as db:  # one consistent view
            seat = await self._seat(db, member_id)
            stored, funds = await self._books(db, seat, now_s)
        return MemberStatus(current_windows(tiers[seat.tier], stored, now_s), seat.member, funds)

    @_atomic
    async def continue_extra_usage(
        self, member_id: int, tiers: Mapping[str, Tier], now_s: float
    ) -> MemberStatus:
        async with self._db.transaction() as db:
            seat = await self._seat(db, member_id, lock="m")
            member, (stored, funds) = seat.member, await self._books(db, seat, now_s)
            windows = current_windows(tiers[seat.tier], stored, now_s)
            if member.extra_usage_enabled:
                await self._open(db, member_id, windows)  # consent ends with a real window
                member = replace(member, consent_until_s=ledger.consent_until(windows, now_s))
                await self._set_consent(db, member_id, member.consent_until_s)
            return MemberStatus(windows, member, funds)

    async def secret(self, name: str) -> str:
        rows = await self._read("SELECT value FROM secrets WHERE name = ?", (name,))
        return rows[0][0]

    def _step(self) -> AbstractAsyncContextManager[Tx]:
        """The transaction of an admission or a settlement (books.py decides them in memory)."""
        return self._db.transaction()

    # -- the writes of admission and settlement (books.py keeps its copy of the books in step)

    async def _open(self, db: Tx, member_id: int, windows: Windows) -> None:
        """Store the windows that this instant opened."""
        for kind in windows.opened:
            w = windows.by_kind[kind]
            await db.execute(
                "INSERT INTO windows (member_id, kind, started_at_s, ends_at_s) VALUES (?, ?, ?, ?)",
                (member_id, kind, w.started_at_s, w.ends_at_s),
            )

    async def _move_windows(
        self,
        db: Tx,
        member_id: int,
        starts: tuple[float | None, float | None],
        used_nanos: int,
        reserved_nanos: int,
    ) -> None:
        """Add to the used and reserved amounts of the member's windows that began at `starts`."""
        await db.execute(
            MOVE_WINDOWS_SQL, (used_nanos, reserved_nanos, *windows_at(member_id, starts))
        )

    async def _set_consent(self, db: Tx, member_id: int, until_s: float | None) -> None:
        await db.execute(
            "UPDATE members SET consent_until_s = ? WHERE id = ?", (until_s, member_id)
        )

    async def _move_balance(
        self,
        db: Tx,
        org_id: str,
        spent_nanos: int,
        reserved_nanos: int,
        *,
        reload_pending: bool | None = None,
    ) -> None:
        """Take what extra usage spent from the prepaid balance, add to what it holds in
        reservations, and mark (or not) a reload as pending."""
        await db.execute(
            "UPDATE orgs SET balance_nanos = balance_nanos - ?, "
            "balance_reserved_nanos = balance_reserved_nanos + ?, "
            "reload_pending = COALESCE(?, reload_pending) WHERE id = ?",
            (
                spent_nanos,
                reserved_nanos,
                None if reload_pending is None else int(reload_pending),
                org_id,
            ),
        )

    async def _record_admission(self, db: Tx, r: AdmissionRequest, p: Pending) -> None:
        await db.execute(
            """INSERT INTO requests (id, member_id, org_id, model, stream, status, billing,
                   reserved_nanos, extra_reserved_nanos, month, session_started_at_s,
                   weekly_started_at_s, created_at_s, expires_at_s)
               VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                r.request_id,
                r.member_id,
                r.org_id,
                p.model,
                int(r.stream),
                p.billing,
                p.reserved_nanos,
                p.extra_reserved_nanos,
                p.month,
                p.session_started_at_s,
                p.weekly_started_at_s,
                r.created_at_s,
                r.expires_at_s,
            ),
        )

    # -- the reads of admission and settlement (books.py answers them from memory)

    async def _settling(self, db: Tx, request_id: str) -> tuple[Pending, str, _SeatRow] | None:
        """A request to settle (pending, or expired and so posted late), its status and its
        seat, the request and member rows locked in one statement; None once settled."""
        row = await db.fetchrow(
            f"""SELECT r.member_id, r.model, r.billing, r.reserved_nanos, r.extra_reserved_nanos,
                   r.month, r.session_started_at_s, r.weekly_started_at_s, r.status,
                   {_SEAT_COLUMNS}
               FROM requests r JOIN members m ON m.id = r.member_id {_SEAT_JOINS}
               WHERE r.id = ? AND r.status IN ('pending', 'expired')
               {self._db.for_update("r, m")}""",
            (request_id,),
        )
        if row is None:
            return None
        values = tuple(row)
        return Pending(*values[:8]), values[8], _SeatRow(*values[9:])

    async def get_request(self, request_id: str) -> RequestRecord | None:
        rows = await self._read("SELECT * FROM requests WHERE id = ?", (request_id,))
        return _request_record(rows[0]) if rows else None

    async def recent_requests(self, limit: int) -> list[RequestRecord]:
        rows = await self._read(
            "SELECT * FROM requests ORDER BY created_at_s DESC, rowid DESC LIMIT ?", (limit,)
        )
        return [_request_record(row) for row in rows]

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._db.reading() as db:
            return await db.fetch(sql, params)

    @_atomic
    async def apply_orgs(self, orgs: list[OrgSpec], now_s: float) -> None:
        async with self._db.transaction() as db:
            await db.lock_named("apply_orgs")  # replicas that start at once apply it in turn
            declared = {
                row[0]: row[1] for row in await db.fetch("SELECT name, value FROM declared")
            }

            async def changed(name: str, value: object) -> bool:
                """True when the file's value differs from what it said last time."""
                encoded = json.dumps(value, sort_keys=True)
                if declared.get(name) == encoded:
                    return False
                await db.execute(
                    "INSERT INTO declared (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (name, encoded),
                )
                return True

            for org in orgs:
                await db.execute(
                    "INSERT INTO orgs (id, plan, timezone, created_at_s) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING",
                    (org.id, org.plan, org.timezone, now_s),
                )
                org_values: list[tuple[str, object]] = [
                    ("plan", org.plan),
                    ("timezone", org.timezone),
                    ("extra_usage", org.extra_usage),
                ]
                if org.webhook_url is not None:
                    org_values.append(("webhook_url", org.webhook_url))
                    org_values.append(("webhook_secret_env", org.webhook_secret_env))
                if org.reservation is not None:
                    org_values.append(("reservation", org.reservation))
                if org.monthly_limit is not None:
                    org_values.append(("monthly_limit_nanos", _nanos(org.monthly_limit)))
                if org.reload_amount_nanos is not None:
                    org_values.append(("reload_threshold_nanos", org.reload_threshold_nanos))
                    org_values.append(("reload_amount_nanos", org.reload_amount_nanos))
                for column, value in org_values:
                    if await changed(f"org/{org.id}/{column}", value):
                        await db.execute(
                            f"UPDATE orgs SET {column} = ? WHERE id = ?", (value, org.id)
                        )
                for tier, limit in org.tier_limits.items():
                    if await changed(f"org/{org.id}/tier_limits/{tier}", _nanos(limit)):
                        await db.execute(
                            "INSERT INTO tier_limits (org_id, tier, monthly_limit_nanos) "
                            "VALUES (?, ?, ?) ON CONFLICT (org_id, tier) DO UPDATE SET "
                            "monthly_limit_nanos = excluded.monthly_limit_nanos",
                            (org.id, tier, _nanos(limit)),
                        )
                if org.credits_nanos:  # the opening balance is bought once, ever
                    with contextlib.suppress(IdempotencyConflict):  # a later change buys nothing
                        await self._purchase(
                            db,
                            org.id,
                            org.credits_nanos,
                            "orgs.toml/credits_usd",
                            now_s,
                            "purchase",
                        )
                for m in org.members:
                    await db.execute(
                        "INSERT INTO members (org_id, email, role, tier, created_at_s) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (org_id, email) DO NOTHING",
                        (org.id, m.email, m.role, m.tier, now_s),
                    )
                    row = await db.fetchrow(
                        "SELECT id FROM members WHERE org_id = ? AND email = ?",
                        (org.id, m.email),
                    )
                    member_id = row[0]
                    selected = org.extra_usage == "selected" and m.email in org.extra_usage_members
                    for column, value in (
                        ("role", m.role),
                        ("tier", m.tier),
                        ("extra_usage_consent", m.extra_usage_consent),
                        ("extra_usage_enabled", int(selected)),
                        *(
                            [("monthly_limit_nanos", _nanos(m.monthly_limit))]
                            if m.monthly_limit is not None
                            else []
                        ),
                    ):
                        if await changed(f"member/{org.id}/{m.email}/{column}", value):
                            await db.execute(
                                f"UPDATE members SET {column} = ? WHERE id = ?", (value, member_id)
                            )
                    for sha, prefix in zip(m.key_sha256s, m.key_prefixes, strict=True):
                        # A declared key is added once; revoking it later sticks.
                        await db.execute(
                            "INSERT INTO keys (key_sha256, member_id, prefix, created_at_s) "
                            "VALUES (?, ?, ?, ?) ON CONFLICT (key_sha256) DO NOTHING",
                            (sha, member_id, prefix, now_s),
                        )

    @_atomic
    async def issue_key(self, member_id: int, key_sha256: str, prefix: str, now_s: float) -> None:
        async with self._db.transaction() as db:
            await db.execute(
                "INSERT INTO keys (key_sha256, member_id, prefix, created_at_s) "
                "VALUES (?, ?, ?, ?)",
                (key_sha256, member_id, prefix, now_s),
            )

    @_atomic
    async def revoke_key(self, prefix_or_sha256: str, now_s: float) -> int:
        """Revoke the one live key with this prefix (or hash); returns how many matched, and
        revokes nothing when a prefix is ambiguous."""
        async with self._db.transaction() as db:
            rows = await db.fetch(
                "SELECT key_sha256 FROM keys WHERE (prefix = ? OR key_sha256 = ?) "
                "AND revoked_at_s IS NULL",
                (prefix_or_sha256, prefix_or_sha256),
            )
            if len(rows) == 1:
                await db.execute(
                    "UPDATE keys SET revoked_at_s = ? WHERE key_sha256 = ?", (now_s, rows[0][0])
                )
            return len(rows)

    async def key_org(self, prefix_or_sha256: str) -> str | None:
        """The org of the live key(s) with this prefix, for authorising a revocation."""
        rows = await self._read(
            "SELECT DISTINCT m.org_id FROM keys k JOIN members m ON m.id = k.member_id "
            "WHERE (k.prefix = ? OR k.key_sha256 = ?) AND k.revoked_at_s IS NULL",
            (prefix_or_sha256, prefix_or_sha256),
        )
        return rows[0][0] if len(rows) == 1 else None

    async def get_org(self, org_id: str) -> OrgView | None:
        orgs = await self._read(
            "SELECT id, plan, timezone, extra_usage, monthly_limit_nanos, balance_nanos, "
            "reload_threshold_nanos, reload_amount_nanos, reservation, webhook_url "
            "FROM orgs WHERE id = ?",
            (org_id,),
        )
        if not orgs:
            return None
        members = await self._read(
            "SELECT email, role, tier, extra_usage_enabled, monthly_limit_nanos, "
            "extra_usage_consent FROM members WHERE org_id = ? AND removed = 0 ORDER BY id",
            (org_id,),
        )
        tiers = await self._read(
            "SELECT tier, monthly_limit_nanos FROM tier_limits WHERE org_id = ? ORDER BY tier",
            (org_id,),
        )
        return OrgView(
            *orgs[0],
            members=tuple(MemberView(*m) for m in members),
            tier_limits={tier: limit for tier, limit in tiers},
        )

    @_atomic
    async def update_org(
        self,
        org_id: str,
        changes: Mapping[str, object],
        extra_usage_members: tuple[str, ...] | None = None,
    ) -> bool:
        """Change org settings (columns named as in the orgs table); for extra usage on
        selected members, `extra_usage_members` lists them."""
        _only(changes, ORG_COLUMNS, "org")
        async with self._db.transaction() as db:
            exists = await db.fetchrow("SELECT 1 FROM orgs WHERE id = ?", (org_id,))
            if not exists:
                return False
            for column, value in changes.items():
                await db.execute(f"UPDATE orgs SET {column} = ? WHERE id = ?", (value, org_id))
            if extra_usage_members is not None:
                await db.execute(
                    "UPDATE members SET extra_usage_enabled = 0 WHERE org_id = ?", (org_id,)
                )
                for email in extra_usage_members:
                    await db.execute(
                        "UPDATE members SET extra_usage_enabled = 1 WHERE org_id = ? AND email = ?",
                        (org_id, email),
                    )
            return True

    @_atomic
    async def set_tier_limit(self, org_id: str, tier: str, limit_nanos: int | None) -> None:
        async with self._db.transaction() as db:
            await db.execute(
                "INSERT INTO tier_limits (org_id, tier, monthly_limit_nanos) VALUES (?, ?, ?) "
                "ON CONFLICT (org_id, tier) DO UPDATE SET "
                "monthly_limit_nanos = excluded.monthly_limit_nanos",
                (org_id, tier, limit_nanos),
            )

    @_atomic
    async def create_org(self, org_id: str, plan: str, timezone: str, now_s: float) -> bool:
        async with self._db.transaction() as db:
            changed = await db.execute(
                "INSERT INTO orgs (id, plan, timezone, created_at_s) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (org_id, plan, timezone, now_s),
            )
            return changed == 1

    @_atomic
    async def create_member(
        self, org_id: str, email: str, fields: Mapping[str, object], now_s: float
    ) -> int | None:
        """A new seat (or a removed one back); None when the email already has a seat."""
        _only(fields, MEMBER_COLUMNS, "member")
        async with self._db.transaction() as db:
            row = await db.fetchrow(
                "SELECT id, removed FROM members WHERE org_id = ? AND email = ?",
                (org_id, email),
            )
            if row is not None and not row[1]:
                return None
            if row is None:
                created = await db.fetchrow(
                    "INSERT INTO members (org_id, email, role, tier, created_at_s) "
                    "VALUES (?, ?, 'member', 'standard', ?) RETURNING id",
                    (org_id, email, now_s),
                )
                member_id = created[0]
            else:
                member_id = row[0]
                await db.execute("UPDATE members SET removed = 0 WHERE id = ?", (member_id,))
            for column, value in fields.items():
                await db.execute(
                    f"UPDATE members SET {column} = ? WHERE id = ?", (value, member_id)
                )
            return member_id

    @_atomic
    async def update_member(self, org_id: str, email: str, fields: Mapping[str, object]) -> bool:
        _only(fields, MEMBER_COLUMNS, "member")
        async with self._db.transaction() as db:
            for column, value in fields.items():
                await db.execute(
                    f"UPDATE members SET {column} = ? WHERE org_id = ? AND email = ? "
                    "AND removed = 0",
                    (value, org_id, email),
                )
            return True

    @_atomic
    async def remove_member(self, org_id: str, email: str, now_s: float) -> bool:
        """The seat ends and its keys are revoked; its records and transfers stay."""
        async with self._db.transaction() as db:
            changed = await db.execute(
                "UPDATE members SET removed = 1 WHERE org_id = ? AND email = ? AND removed = 0",
                (org_id, email),
            )
            await db.execute(
                "UPDATE keys SET revoked_at_s = ? WHERE revoked_at_s IS NULL AND member_id = "
                "(SELECT id FROM members WHERE org_id = ? AND email = ?)",
                (now_s, org_id, email),
            )
            return changed == 1

    async def pending_count(self) -> int:
        rows = await self._read("SELECT COUNT(*) FROM requests WHERE status = 'pending'")
        return rows[0][0]

    async def list_keys(self, org_id: str, email: str) -> list[tuple[str, float, float | None]]:
        """A member's keys as (prefix, created_at_s, revoked_at_s): never more than the prefix."""
        rows = await self._read(
            "SELECT k.prefix, k.created_at_s, k.revoked_at_s FROM keys k JOIN members m "
            "ON m.id = k.member_id WHERE m.org_id = ? AND m.email = ? ORDER BY k.created_at_s",
            (org_id, email),
        )
        return [tuple(row) for row in rows]

    async def member_id(self, org_id: str, email: str) -> int | None:
        rows = await self._read(
            "SELECT id FROM members WHERE org_id = ? AND email = ? AND removed = 0",
            (org_id, email),
        )
        return rows[0][0] if rows else None

    async def ping(self) -> None:
        await self._db.ping()

    async def close(self) -> None:
        await self._db.close()


def _funds(seat: _SeatRow, month: str, spent: Spent) -> ExtraFunds:
    """What extra usage can draw on for the member this month: the org's limit, the member's
    (or their tier's, Enterprise) and the prepaid balance."""
    org_spent, member_spent = spent[0], spent[seat.member_id]
    accounts = [Account(ORG_MONTHLY, seat.org_limit_nanos, *org_spent)]
    if seat.plan == "enterprise" and seat.member_limit_nanos is not None:
        accounts.append(Account(MEMBER_MONTHLY, seat.member_limit_nanos, *member_spent))
    elif seat.plan == "enterprise" and seat.tier_limit_nanos is not None:
        accounts.append(Account(TIER_MONTHLY, seat.tier_limit_nanos, *member_spent))
    prepaid = seat.plan in PREPAID_PLANS
    if prepaid:
        accounts.append(Account(BALANCE, seat.balance_nanos, 0, seat.balance_reserved_nanos))
    return ExtraFunds(
        month, prepaid, tuple(accounts), seat.timezone, member_spent[0], seat.reservation
    )


def _request_record(row: Any) -> RequestRecord:
    usage = Usage(
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        cache_creation_5m_input_tokens=row["cache_creation_5m_input_tokens"],
        cache_creation_1h_input_tokens=row["cache_creation_1h_input_tokens"],
        cache_read_input_tokens=row["cache_read_input_tokens"],
        web_search_requests=row["web_search_requests"],
        speed=row["speed"],
        output_estimated=bool(row["output_estimated"]),
    )
    return RequestRecord(
        request_id=row["id"],
        member_id=row["member_id"],
        model=row["model"],
        stream=bool(row["stream"]),
        status=row["status"],
        usage=usage,
        reserved_nanos=row["reserved_nanos"],
        cost_nanos=row["cost_nanos"],
        upstream_status=row["upstream_status"],
        outcome=row["outcome"],
        billing=row["billing"],
        included_nanos=row["included_nanos"],
        extra_nanos=row["extra_nanos"],
        overrun_nanos=row["overrun_nanos"],
    )


def _starts(windows: Windows | Mapping[str, Window]) -> Starts:
    """When the session and weekly windows began (None for a kind the tier does not have)."""
    session, weekly = windows.get(ledger.SESSION), windows.get(ledger.WEEKLY)
    return (session.started_at_s if session else None, weekly.started_at_s if weekly else None)


def _started_of(table: str) -> str:
    """When the window of `w`'s kind began, for a row of `requests` or `leases`."""
    return (
        f"CASE w.kind WHEN 'session' THEN {table}.session_started_at_s "
        f"ELSE {table}.weekly_started_at_s END"
    )


def _nanos(limit: int | str | None) -> int | None:
    """A declared limit as stored: nanos, or NULL for "unlimited"."""
    return None if limit == "unlimited" else limit  # type: ignore[return-value]


def _only(columns: Mapping[str, object], allowed: frozenset[str], what: str) -> None:
    """Column names are put into SQL: only the known settings may pass."""
    unknown = set(columns) - allowed
    if unknown:
        raise ValueError(f"not a {what} setting: {sorted(unknown)}")
