"""The members' books in memory: the reads of admission and settlement answered without a query.

`Copy` is `SqlStore` answering the reads of admission and settlement from a copy of the books,
each write applied to the copy too. The SQLite store keeps its copy across steps (`Books`,
below); the PostgreSQL store reads one for each batch of steps, under the batch's locks, and
forgets it with the batch (batches.py).

On SQLite: `SqlStore` reads a member's seat, windows and month spend at every admission and
again at every settlement, and writes and commits its changes before it answers. `Books` runs
the same steps, the same decisions and the same statements, but

- answers those reads from a copy of the books it keeps in step with its own writes (each write
  method below applies its change to the copy too), and
- when the copy holds what a step needs, writes the step's statements to the write-behind
  journal (journal.py) instead of running them: one record appended to a file, durable against a
  crash of the process once written; `SqliteDatabase` applies the records to the tables in
  batches, and before any other step reads or writes them.

A step the copy cannot answer (a member's first request, a window of the past, the `expected`
reservation, a reload due while records wait) runs as a transaction, as in `SqlStore`, after the
waiting records, and fills the copy. So does every step when another process owns the journal.

The copy = the tables + the journal's waiting records. It is forgotten, and read again as steps
need it, when

- another connection committed since our last step (`PRAGMA data_version`: an `admin --config`
  run, a second proxy process on the same file),
- a step other than admission and settlement ran since (admin changes, purchases, reloads,
  continuing on extra usage, the reservation sweeper: `SqliteDatabase.steps` counts them), or
- one of our steps failed or its group commit did (what it changed in the copy was rolled back).

It is checked at each admission and settlement, and again under the write lock when a step runs
as a transaction. Between the check and a decision nothing else runs in this process. A commit
by another process (a limit changed by `admin --config`) reaches decisions made in memory within
VERSION_EVERY_S; what our records write is relative (`used = used + ?`), so neither overwrites
the other.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.ledger import SESSION, Window, Windows
from proxy.settings import Tier
from proxy.store.base import Admission, AdmissionRequest, Settled, Settlement
from proxy.store.journal import Statement
from proxy.store.sql import Database, Pending, Spent, SqlStore, Starts, Tx, _SeatRow, _starts

if TYPE_CHECKING:
    from proxy.store.sqlite import SqliteDatabase

R = TypeVar("R")

# A commit by another process reaches the decisions made in memory within this long.
VERSION_EVERY_S = 0.001


class _Miss(Exception):
    """The copy lacks something a step needs: the step runs as a transaction instead."""


class _Recording:
    """The `Tx` of a step decided in memory: its writes are kept, and written as one record of
    the journal once the step has decided; a read (the month's reloads) goes to the tables,
    when they hold every record. (A class, not @asynccontextmanager: 1 us, not 10.)"""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self.statements: list[Statement] = []

    async def __aenter__(self) -> _Recording:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None and self.statements:
            self._db.write_behind(self.statements)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.statements.append((sql, list(params)))
        return 1  # not known before it is applied; admission and settlement never ask

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.statements += [(sql, list(row)) for row in rows]

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._read(sql, params).fetchall()

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any | None:
        return self._read(sql, params).fetchone()

    def _read(self, sql: str, params: Sequence[Any]) -> sqlite3.Cursor:
        if self._db.records_waiting:
            raise _Miss
        return self._db.connection.execute(sql, params)

    async def lock_org(self, org_id: str) -> bool:
        return False

    async def lock_named(self, name: str) -> None:
        """Steps decided in memory run one at a time already."""


class Copy(SqlStore):
    """`SqlStore` answering the reads of admission and settlement from a copy of the books (the
    members' seats, newest windows and month spend, the orgs' money, the pending requests),
    each write applied to the copy too. What the copy lacks is read through `db` and kept, or,
    while a step is decided in memory (`_in_memory`), is a `_Miss`. Used by the SQLite store
    (`Books`, below) and by the PostgreSQL store's batches (batches.py)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self._seats: dict[int, _SeatRow] = {}  # member id -> seat (money as first read)
        self._money: dict[str, tuple[int, int, int]] = {}  # org id -> balance, held, reload
        self._windows: dict[int, dict[str, Window]] = {}  # member id -> newest of each kind
        self._spent: dict[tuple[str, int, str], tuple[int, int]] = {}  # (org, who, month)
        self._pending: dict[str, Pending] = {}  # request id -> what admission recorded
        # A step being decided in memory (never across an await), and whether it changed the copy.
        self._in_memory = False
        self._copy_changed = False

    def _forget(self) -> None:
        self._seats.clear()
        self._money.clear()
        self._windows.clear()
        self._spent.clear()
        self._pending.clear()

    def _before_read(self) -> None:
        """Called before the seat is read outside a step decided in memory."""

    # -- reads, answered from the copy

    async def _seat(self, db: Tx, member_id: int, *, lock: str | None = None) -> _SeatRow:
        if not self._in_memory:
            self._before_read()
        seat = self._seats.get(member_id)
        if seat is None:
            if self._in_memory:
                raise _Miss
            seat = self._seats[member_id] = await super()._seat(db, member_id, lock=lock)
            self._money[seat.org_id] = _money_of(seat)
            return seat
        money = self._money[seat.org_id]
        if money != _money_of(seat):
            seat = replace(
                seat,
                balance_nanos=money[0],
                balance_reserved_nanos=money[1],
                reload_pending=money[2],
            )
        return seat

    async def _stored(
        self, db: Tx, seat: _SeatRow, month: str, starts: Starts | None
    ) -> tuple[dict[str, Window], Spent]:
        member_id = seat.member_id
        windows = self._windows.get(member_id)
        org_key, member_key = (seat.org_id, 0, month), (seat.org_id, member_id, month)
        org_spent, member_spent = self._spent.get(org_key), self._spent.get(member_key)
        if windows is None or org_spent is None or member_spent is None:
            if self._in_memory:
                raise _Miss
            windows, spent = await super()._stored(db, seat, month, None)
            self._windows[member_id] = windows
            org_spent = self._spent[org_key] = spent[0]
            member_spent = self._spent[member_key] = spent[member_id]
        if starts is not None and starts != _starts(windows):
            if self._in_memory:
                raise _Miss
            return await super()._stored(db, seat, month, starts)  # windows of the past
        return dict(windows), {0: org_spent, member_id: member_spent}

    async def _settling(self, db: Tx, request_id: str) -> tuple[Pending, str, _SeatRow] | None:
        pending = self._pending.get(request_id)
        if pending is None:  # admitted before the copy was last forgotten: read it
            if self._in_memory:
                raise _Miss
            return await super()._settling(db, request_id)
        del self._pending[request_id]
        self._copy_changed = True
        return pending, "pending", await self._seat(db, pending.member_id)

    async def _reservation(self, db: Tx, r: AdmissionRequest, mode: str) -> int:
        if mode == "expected" and self._in_memory:
            raise _Miss  # it reads the member's recent requests from the tables
        return await super()._reservation(db, r, mode)

    # -- writes, applied to the copy too (each marks it changed)

    async def _open(self, db: Tx, member_id: int, windows: Windows) -> None:
        await super()._open(db, member_id, windows)
        self._copy_changed = True
        newest = self._windows.get(member_id)
        if newest is not None:
            for kind in windows.opened:
                opened = windows.by_kind[kind]
                newest[kind] = Window(kind, opened.started_at_s, opened.ends_at_s, 0)

    async def _move_windows(
        self, db: Tx, member_id: int, starts: Starts, used_nanos: int, reserved_nanos: int
    ) -> None:
        await super()._move_windows(db, member_id, starts, used_nanos, reserved_nanos)
        self._copy_changed = True
        newest = self._windows.get(member_id)
        if newest is not None:
            for kind, window in newest.items():
                # as the UPDATE's WINDOWS_AT: the window of each kind that began at its start
                if window.started_at_s == starts[kind != SESSION]:
                    newest[kind] = Window(
                        kind,
                        window.started_at_s,
                        window.ends_at_s,
                        0,  # limits are not stored (the tier of the day supplies them)
                        window.used_nanos + used_nanos,
                        window.reserved_nanos + reserved_nanos,
                    )

    async def _set_consent(self, db: Tx, member_id: int, until_s: float | None) -> None:
        await super()._set_consent(db, member_id, until_s)
        self._copy_changed = True
        seat = self._seats.get(member_id)
        if seat is not None:
            self._seats[member_id] = replace(seat, consent_until_s=until_s)

    async def _move_spend(
        self,
        db: Tx,
        org_id: str,
        member_id: int,
        month: str,
        posted_nanos: int,
        reserved_nanos: int,
    ) -> None:
        await super()._move_spend(db, org_id, member_id, month, posted_nanos, reserved_nanos)
        self._copy_changed = True
        for key in ((org_id, 0, month), (org_id, member_id, month)):
            had = self._spent.get(key)
            if had is not None:
                self._spent[key] = (had[0] + posted_nanos, had[1] + reserved_nanos)

    async def _move_balance(
        self,
        db: Tx,
        org_id: str,
        spent_nanos: int,
        reserved_nanos: int,
        *,
        reload_pending: bool | None = None,
    ) -> None:
        await super()._move_balance(
            db, org_id, spent_nanos, reserved_nanos, reload_pending=reload_pending
        )
        self._copy_changed = True
        money = self._money.get(org_id)
        if money is not None:
            balance_nanos, held_nanos, pending = money
            self._money[org_id] = (
                balance_nanos - spent_nanos,
                held_nanos + reserved_nanos,
                pending if reload_pending is None else int(reload_pending),
            )

    async def _record_admission(self, db: Tx, r: AdmissionRequest, p: Pending) -> None:
        await super()._record_admission(db, r, p)
        self._copy_changed = True
        self._pending[r.request_id] = p


class Books(Copy):
    """`Copy` on SQLite, kept across steps: the books of each member stay in memory."""

    def __init__(self, db: SqliteDatabase) -> None:
        super().__init__(db)
        self._sqlite = db
        self._steps_seen = -1
        self._version_seen = -1
        self._version_read_s = float("-inf")

    async def admit(self, request: AdmissionRequest, tiers: Mapping[str, Tier]) -> Admission:
        return await self._in_memory_first(super().admit, request, tiers)

    async def settle(self, settlement: Settlement, tiers: Mapping[str, Tier]) -> Settled | None:
        return await self._in_memory_first(super().settle, settlement, tiers)

    async def _in_memory_first(self, step: Callable[..., Awaitable[R]], *args: Any) -> R:
        """Decide the step in memory when the copy holds what it needs, else as a transaction."""
        try:
            if self._sqlite.journal is not None:
                self._begin_in_memory()
                try:
                    return await step(*args)
                except _Miss:
                    self._missed()
                finally:
                    self._in_memory = False
            return await step(*args)
        except BaseException:
            self._forget()  # whatever it changed in the copy may have been rolled back
            raise

    def _begin_in_memory(self) -> None:
        self._check(exact=False)
        self._in_memory, self._copy_changed = True, False

    def _missed(self) -> None:
        """The step will run as a transaction: what it changed in the copy must not count twice."""
        if self._copy_changed:
            self._forget()

    def _step(self) -> AbstractAsyncContextManager[Tx]:
        return _Recording(self._sqlite) if self._in_memory else self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Tx]:
        """A step that runs as a transaction: the copy is checked again under the write lock."""
        async with self._sqlite.transaction(counted=False) as tx:
            self._check()
            yield tx

    def _check(self, *, exact: bool = True) -> None:
        """Forget the copy if a step not its own (counted by `SqliteDatabase.steps`) or another
        connection (`data_version`) wrote since the last check. Not `exact`: SQLite is asked
        at most once per VERSION_EVERY_S (6 us a time, twice a request otherwise)."""
        now_s = time.monotonic()
        if exact or now_s - self._version_read_s >= VERSION_EVERY_S:
            self._version_read_s, version = now_s, self._sqlite.data_version()
        else:
            version = self._version_seen
        steps = self._sqlite.steps
        if steps != self._steps_seen or version != self._version_seen:
            self._forget()
        self._steps_seen, self._version_seen = steps, version

    def _before_read(self) -> None:
        self._check()  # continuing, status: steps of SqlStore's that read the seat


def _money_of(seat: _SeatRow) -> tuple[int, int, int]:
    return seat.balance_nanos, seat.balance_reserved_nanos, seat.reload_pending
