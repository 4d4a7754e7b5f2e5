"""The members' books in memory, for the SQLite store: admission and settlement read nothing.

`SqlStore` reads a member's seat, windows and month spend at every admission and again at every
settlement; on the embedded store those reads were most of the store's CPU. `Books` runs the same
steps, the same decisions and the same writes, but answers those reads from a copy it keeps in
step with its own writes (each write method below applies its change to the copy too).

It is never stale, because it is checked where it is used: inside the write transaction, which
holds SQLite's one write lock, so nothing can change the file between the check and the commit.
The copy is forgotten, and read again as steps need it, when

- another connection committed since our last step (`PRAGMA data_version`: an `admin --config`
  run, a second proxy process on the same file),
- a step of ours other than admission, settlement, continuing and status ran since (admin
  changes, purchases, reloads, the reservation sweeper: `SqliteDatabase.steps` counts every
  step), or
- one of our steps failed or its group commit did (what it changed in the copy was rolled back).

Only `Books`' own steps may move a window, spend or balance through the methods it mirrors
without calling `_check` first (`_seat` and `_settling` do); every other step is counted and so
forgets the copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from proxy.ledger import Window, Windows
from proxy.settings import Tier
from proxy.store.base import Admission, AdmissionRequest, Settled, Settlement
from proxy.store.sql import Pending, Spent, SqlStore, Starts, Tx, _SeatRow, _starts

if TYPE_CHECKING:
    from proxy.store.sqlite import SqliteDatabase


class Books(SqlStore):
    """`SqlStore` on SQLite with each member's books (seat, newest windows, month spend, the
    org's balance) and the pending requests kept in memory."""

    def __init__(self, db: SqliteDatabase) -> None:
        super().__init__(db)
        self._sqlite = db
        self._seats: dict[int, _SeatRow] = {}  # member id -> seat (money as first read)
        self._money: dict[str, tuple[int, int, int]] = {}  # org id -> balance, held, reload
        self._windows: dict[int, dict[str, Window]] = {}  # member id -> newest of each kind
        self._spent: dict[tuple[str, int, str], tuple[int, int]] = {}  # (org, who, month)
        self._pending: dict[str, Pending] = {}  # request id -> what admission recorded
        self._steps_seen = -1
        self._version_seen = -1

    async def admit(self, request: AdmissionRequest, tiers: Mapping[str, Tier]) -> Admission:
        try:
            return await super().admit(request, tiers)
        except BaseException:
            self._forget()  # whatever it changed in the copy may have been rolled back
            raise

    async def settle(self, settlement: Settlement, tiers: Mapping[str, Tier]) -> Settled | None:
        try:
            return await super().settle(settlement, tiers)
        except BaseException:
            self._forget()
            raise

    def _check(self) -> None:
        """In a step, under the write lock: forget the copy if anything but our own steps may
        have changed the file since the last one."""
        steps, version = self._sqlite.steps, self._sqlite.data_version()
        if steps - self._steps_seen > 1 or version != self._version_seen:
            self._forget()
        self._steps_seen, self._version_seen = steps, version

    def _forget(self) -> None:
        self._seats.clear()
        self._money.clear()
        self._windows.clear()
        self._spent.clear()
        self._pending.clear()

    # -- reads, answered from the copy

    async def _seat(self, db: Tx, member_id: int, *, lock: str | None = None) -> _SeatRow:
        self._check()
        seat = self._seats.get(member_id)
        if seat is None:
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
            windows, spent = await super()._stored(db, seat, month, None)
            self._windows[member_id] = windows
            org_spent = self._spent[org_key] = spent[0]
            member_spent = self._spent[member_key] = spent[member_id]
        if starts is not None and starts != _starts(windows):
            return await super()._stored(db, seat, month, starts)  # windows of the past
        return dict(windows), {0: org_spent, member_id: member_spent}

    async def _settling(self, db: Tx, request_id: str) -> tuple[Pending, str, _SeatRow] | None:
        self._check()
        pending = self._pending.pop(request_id, None)
        if pending is None:  # admitted before the copy was last forgotten: read it
            return await super()._settling(db, request_id)
        return pending, "pending", await self._seat(db, pending.member_id)

    # -- writes, applied to the copy too

    async def _open(self, db: Tx, member_id: int, windows: Windows) -> None:
        await super()._open(db, member_id, windows)
        newest = self._windows.get(member_id)
        if newest is not None:
            for kind in windows.opened:
                opened = windows.by_kind[kind]
                newest[kind] = Window(kind, opened.started_at_s, opened.ends_at_s, 0)

    async def _move_windows(
        self, db: Tx, member_id: int, starts: Starts, used_nanos: int, reserved_nanos: int
    ) -> None:
        await super()._move_windows(db, member_id, starts, used_nanos, reserved_nanos)
        newest = self._windows.get(member_id)
        if newest is not None:
            for kind, window in newest.items():
                if window.started_at_s in starts:  # as the UPDATE's `started_at_s IN (?, ?)`
                    newest[kind] = replace(
                        window,
                        used_nanos=window.used_nanos + used_nanos,
                        reserved_nanos=window.reserved_nanos + reserved_nanos,
                    )

    async def _set_consent(self, db: Tx, member_id: int, until_s: float | None) -> None:
        await super()._set_consent(db, member_id, until_s)
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
        self._pending[r.request_id] = p


def _money_of(seat: _SeatRow) -> tuple[int, int, int]:
    return seat.balance_nanos, seat.balance_reserved_nanos, seat.reload_pending
