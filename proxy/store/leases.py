"""Leases: headroom a PostgreSQL replica holds in a member's windows, so that it admits and
settles the member's requests on included quota in memory, with no round trip to the server
before a request goes upstream (docs/postgresql-leases.md).

A lease is taken in a batch (batches.py), under the member's row lock, right after an admission
the batch decided: an amount added to the reserved_nanos of the member's current windows, and a
row in `leases`. To every other replica it is a reservation like a request's in flight, so every
limit holds across replicas: used, in flight and leased never pass a limit together.

While a replica holds a member's lease:

- an admission on included quota whose worst case fits in what is left of the lease is decided
  here: its reservation moves from the lease to the request (the windows' reserved amount does
  not change);
- its settlement, when the cost is within that reservation, adds the cost to the windows' used
  amount and gives the rest of the reservation back to the lease. Used plus reserved does not
  grow, so no limit can be crossed and nothing needs deciding under a lock;
- each step's statements are one record of the replica's journal file (journal.py), written
  before the step returns, so a crash of the process loses none. They reach the tables in the
  next batch, within APPLY_AFTER_S, with the number of the last record applied
  (`journals_applied`). A replica that restarts applies what its journal holds past that number
  before it serves.

Anything else runs in a batch, after the member's records: a member's first request, a window
that ended, a worst case larger than the lease, extra usage, an org that reserves the
`expected` amount, a cost past its reservation. An admission first gives the member's lease
back, so that the exact decision counts its headroom as free.

A lease is given back after LEASE_IDLE_S without an admission, some LEASE_AGE_MAX_S after it was
taken (what it knows of the seat and the org is that old), and when the store closes; both are
looked for every LEASE_TTL_S / 4, when a batch renews the leases no other batch renewed (each
batch renews the leases of its members). Its row expires LEASE_TTL_S after the replica last
renewed it, and then the sweeper of any replica gives its amount back to the windows. A replica
uses a lease only for LEASE_TTL_S / 2 after the last renewal that committed, so a replica cut
off from the server stops using its leases well before another replica's sweeper frees them. The statements
that move a lease first check that it still exists: a record applied after its lease expired
(a replica that restarted late) moves the windows instead.

Durability: a step is on the replica's disk before it returns, as on SQLite. A replica whose
host is lost with its disk loses the steps it had not applied (at most APPLY_AFTER_S and one
batch of them): its requests in flight, which recovery charges nothing anyway, and the
settlements of those last milliseconds, which recovery then charges nothing either.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.clock import SystemClock
from proxy.ledger import (
    INCLUDED,
    Admitted,
    ExtraFunds,
    MemberState,
    Months,
    Split,
    Window,
    current_windows,
    with_limits,
)
from proxy.settings import Tier
from proxy.store.base import Admission, AdmissionRequest, Settled, Settlement
from proxy.store.journal import Journal, Statement
from proxy.store.sql import (
    WINDOWS_AT,
    Pending,
    SqlStore,
    Starts,
    _SeatRow,
    _starts,
    windows_at,
)

# A lease is this many times the worst case of the admission that took it, and never more than
# 1 / LEASE_SHARE of the headroom left after it (the rest stays for the other replicas).
LEASE_WORST_CASES = 16
LEASE_SHARE = 2
LEASE_IDLE_S = 15.0
LEASE_AGE_MAX_S = 60.0  # ... give or take LEASE_AGE_JITTER, so that leases end at different times
LEASE_AGE_JITTER = 0.25
LEASE_TTL_S = 20.0
# The journal's records reach the tables within this long, many in one batch.
APPLY_AFTER_S = 0.01
JOURNAL_SIZE_MAX_BYTES = 1024 * 1024

# A lease moves with these statements; each checks that the lease still exists (see above).
TAKE_SQL = (
    "INSERT INTO leases (id, member_id, session_started_at_s, weekly_started_at_s, "
    "amount_nanos, expires_at_s) VALUES (?, ?, ?, ?, ?, ?)"
)
ADMIT_SQL = f"""WITH lease AS (
    UPDATE leases SET amount_nanos = amount_nanos - ? WHERE id = ? RETURNING id)
UPDATE windows SET reserved_nanos = reserved_nanos + ?
WHERE {WINDOWS_AT} AND NOT EXISTS (SELECT 1 FROM lease)"""
SETTLE_SQL = f"""WITH lease AS (
    UPDATE leases SET amount_nanos = amount_nanos + ? WHERE id = ? RETURNING id)
UPDATE windows SET used_nanos = used_nanos + ?, reserved_nanos = reserved_nanos - ?
    + CASE WHEN EXISTS (SELECT 1 FROM lease) THEN ? ELSE 0 END
WHERE {WINDOWS_AT}"""
# Ends leases (by id, or those expired) and takes what is left of them out of the windows.
_END_SQL = """WITH ended AS (
    DELETE FROM leases WHERE {which}
    RETURNING member_id, session_started_at_s, weekly_started_at_s, amount_nanos
), freed AS (
    SELECT w.member_id, w.kind, w.started_at_s, SUM(e.amount_nanos) AS amount_nanos
    FROM windows w JOIN ended e ON w.member_id = e.member_id
        AND (w.kind = 'session' AND w.started_at_s = e.session_started_at_s
            OR w.kind = 'weekly' AND w.started_at_s = e.weekly_started_at_s)
    GROUP BY w.member_id, w.kind, w.started_at_s
)
UPDATE windows w SET reserved_nanos = w.reserved_nanos - f.amount_nanos FROM freed f
WHERE w.member_id = f.member_id AND w.kind = f.kind AND w.started_at_s = f.started_at_s"""
RETURN_SQL = _END_SQL.format(which="id = ?")
EXPIRE_SQL = _END_SQL.format(which="expires_at_s <= ?")
RENEW_SQL = "UPDATE leases SET expires_at_s = ? WHERE id = ANY(?::text[])"
APPLIED_SQL = (
    "INSERT INTO journals_applied (journal, seq) VALUES (?, ?) "
    "ON CONFLICT (journal) DO UPDATE SET seq = EXCLUDED.seq"
)


@dataclass(slots=True)
class Lease:
    """A lease this replica holds, and what it knew of the member when it took it."""

    lease_id: str
    member_id: int
    seat: _SeatRow
    tier: Tier
    member: MemberState
    funds: ExtraFunds
    stored: dict[str, Window]  # the member's windows as the lease saw them, moved by its steps
    starts: Starts
    remaining_nanos: int
    ends_at_s: float  # time.monotonic(), as every instant of a lease's here: given back after
    # this (LEASE_AGE_MAX_S, jittered)
    used_at_s: float
    renewed_at_s: float


@dataclass(slots=True)
class _FromLease:
    """A request admitted from a lease, until its settlement."""

    lease: Lease
    pending: Pending


@dataclass(slots=True)
class Queued:
    """A record of the journal waiting to be applied, and the member whose books it moves."""

    seq: int
    member_id: int
    statements: list[Statement]


class Leases:
    """The leases of one replica and its journal: the steps decided in memory."""

    def __init__(self, store: SqlStore, journal: Journal, name: str) -> None:
        self._store = store  # its SQL for the request rows
        self._clock = SystemClock()  # the leases' expiry in the tables (the sweeper's)
        self.journal = journal
        self.name = name  # this journal's key in `journals_applied`
        self._replica = secrets.token_hex(6)
        self._taken = 0
        self._seq = 0  # the number of the last record written (`restart_at` after a replay)
        self._queue: list[Queued] = []
        self._by_member: dict[int, Lease] = {}
        self._admitted: dict[str, _FromLease] = {}
        self._months = Months()

    # -- steps decided in memory

    def admit(self, r: AdmissionRequest, tiers: Mapping[str, Tier]) -> Admission | None:
        """The admission decided from the member's lease, or None: decide it in a batch."""
        lease = self._by_member.get(r.member_id)
        if lease is None or r.continue_requested:
            return None
        worst_case_nanos = r.worst_case_nanos
        now_s = time.monotonic()
        if (
            worst_case_nanos > lease.remaining_nanos
            or not self._usable(lease, now_s)
            or tiers.get(lease.seat.tier) is not lease.tier  # the plans changed
        ):
            return None
        windows = current_windows(lease.tier, lease.stored, r.created_at_s)
        if windows.opened or windows.clock_went_back or _starts(windows) != lease.starts:
            return None  # a window ended: the next one opens in a batch
        pending = Pending(
            r.member_id,
            r.model,
            INCLUDED,
            worst_case_nanos,
            0,
            self._months.of(r.created_at_s, lease.seat.timezone),
            *lease.starts,
        )
        statements = _recorded(self._store._record_admission, r, pending)
        statements.append(
            (
                ADMIT_SQL,
                [
                    worst_case_nanos,
                    lease.lease_id,
                    worst_case_nanos,
                    *windows_at(r.member_id, lease.starts),
                ],
            )
        )
        self._write(r.member_id, statements)
        lease.remaining_nanos -= worst_case_nanos
        lease.used_at_s = now_s
        self._admitted[r.request_id] = _FromLease(lease, pending)
        return Admission(Admitted(INCLUDED, worst_case_nanos), windows, lease.member, lease.funds)

    def member_of(self, request_id: str) -> int | None:
        """The member of a request admitted from a lease (and forget it): its settlement runs
        in a batch."""
        admitted = self._admitted.pop(request_id, None)
        return None if admitted is None else admitted.pending.member_id

    def settle(self, s: Settlement) -> Settled | None:
        """The settlement of a request admitted from a lease, when its cost is within its
        reservation; else None (and `member_of` tells whose it is)."""
        admitted = self._admitted.get(s.request_id)
        if admitted is None or s.cost_nanos > admitted.pending.reserved_nanos:
            return None
        lease, p = admitted.lease, admitted.pending
        cost_nanos, reserved_nanos = s.cost_nanos, p.reserved_nanos
        back_nanos = reserved_nanos - cost_nanos
        split = Split(cost_nanos, 0, 0)  # the windows held the worst case: it fits in them
        statements = _recorded(self._store._record_settlement, s, split)
        moved = [back_nanos, lease.lease_id, cost_nanos, reserved_nanos, back_nanos]
        statements.append((SETTLE_SQL, [*moved, *windows_at(p.member_id, lease.starts)]))
        self._write(p.member_id, statements)  # (a failure leaves it to settle again)
        del self._admitted[s.request_id]
        windows_before = with_limits(lease.tier, lease.stored)
        _add_used(lease, cost_nanos)
        if self._by_member.get(p.member_id) is lease:
            lease.remaining_nanos += back_nanos
        seat = lease.seat
        return Settled(
            seat.org_id,
            p.member_id,
            split,
            windows_before,
            None,
            request_id=s.request_id,
            member_email=seat.email,
            funds_before=lease.funds,
            balance_after_nanos=seat.balance_nanos if lease.funds.prepaid else None,
            reload_threshold_nanos=seat.reload_threshold_nanos,
            webhook=(seat.webhook_url, seat.webhook_secret_env or "") if seat.webhook_url else None,
        )

    def posted(self, member_id: int, used_nanos: int) -> None:
        """A batch posted a settlement of the member within its reservation: the lease's view
        of the windows (for the headers of the next admissions) follows."""
        lease = self._by_member.get(member_id)
        if lease is not None:
            _add_used(lease, used_nanos)

    def give_back(self, member_id: int) -> None:
        """Return the member's lease (a record like the others): its step runs in a batch."""
        lease = self._by_member.pop(member_id, None)
        if lease is not None:
            self._write(member_id, [(RETURN_SQL, [lease.lease_id])])

    def give_back_idle(self) -> None:
        """Return the leases idle for LEASE_IDLE_S, or past their age."""
        now_s = time.monotonic()
        for lease in list(self._by_member.values()):
            if now_s - lease.used_at_s >= LEASE_IDLE_S or not self._usable(lease, now_s):
                self.give_back(lease.member_id)

    def give_back_all(self) -> None:
        for member_id in list(self._by_member):
            self.give_back(member_id)

    def _usable(self, lease: Lease, now_s: float) -> bool:
        return now_s < lease.ends_at_s and now_s - lease.renewed_at_s < LEASE_TTL_S / 2

    def _write(self, member_id: int, statements: list[Statement]) -> None:
        seq = self._seq + 1
        self.journal.append(seq, statements)
        self._seq = seq
        self._queue.append(Queued(seq, member_id, statements))

    # -- taking leases (in a batch)

    @property
    def held(self) -> bool:
        return bool(self._by_member)

    def held_by(self, busy: set[int | None]) -> set[int]:
        """The members whose leases a batch may renew: those no running batch has."""
        return {member_id for member_id in self._by_member if member_id not in busy}

    def wants(self, member_id: int) -> bool:
        return member_id not in self._by_member

    def offer(
        self,
        seat: _SeatRow,
        tier: Tier,
        admission: Admission,
        stored: Mapping[str, Window],
        worst_case_nanos: int,
    ) -> tuple[Lease, Statement] | None:
        """A lease for the member of an admission a batch decided on included quota, sized on
        the member's windows as the batch leaves them (`stored`), and the statement that takes
        it; None when the windows have too little headroom left to share."""
        decision = admission.decision
        if (
            not isinstance(decision, Admitted)
            or decision.billing != INCLUDED
            or admission.funds.reservation != "worst_case"
            or worst_case_nanos <= 0
        ):
            return None
        windows = with_limits(tier, stored).by_kind.values()
        if _starts(admission.windows) != _starts(stored) or not windows:
            return None
        headroom_nanos = min(w.limit_nanos - w.used_nanos - w.reserved_nanos for w in windows)
        amount_nanos = min(LEASE_WORST_CASES * worst_case_nanos, headroom_nanos // LEASE_SHARE)
        if amount_nanos < worst_case_nanos:
            return None
        now_s = time.monotonic()
        self._taken += 1
        lease_id = f"{self._replica}-{self._taken}"
        leased = {
            w.kind: Window(
                w.kind,
                w.started_at_s,
                w.ends_at_s,
                0,
                w.used_nanos,
                w.reserved_nanos + amount_nanos,
            )
            for w in windows
        }
        starts = _starts(leased)
        age_s = LEASE_AGE_MAX_S * (1 + LEASE_AGE_JITTER * (2 * random.random() - 1))
        lease = Lease(
            lease_id,
            seat.member_id,
            seat,
            tier,
            admission.member,
            admission.funds,
            leased,
            starts,
            amount_nanos,
            now_s + age_s,
            now_s,
            now_s,
        )
        expires_at_s = self._clock.now_s() + LEASE_TTL_S
        take = (TAKE_SQL, [lease_id, seat.member_id, *starts, amount_nanos, expires_at_s])
        return lease, take

    def hold(self, lease: Lease) -> None:
        """The batch that took the lease committed: admit from it."""
        if lease.member_id in self._by_member:  # two batches took one (cannot happen: busy)
            self._write(lease.member_id, [(RETURN_SQL, [lease.lease_id])])
        else:
            self._by_member[lease.member_id] = lease

    # -- applying the journal (in a batch)

    def take_records(self, busy: set[int | None]) -> list[Queued]:
        """The records waiting whose members no running batch has, in order."""
        taken = [q for q in self._queue if q.member_id not in busy]
        if taken:
            self._queue = [q for q in self._queue if q.member_id in busy]
        return taken

    @property
    def records_waiting(self) -> bool:
        return bool(self._queue)

    def unapplied(self, records: list[Queued]) -> None:
        """A batch that carried these records did not commit: they wait again, first."""
        self._queue[:0] = records

    def renewing(self, members: set[int | None]) -> tuple[float, float, list[str]]:
        """A batch renews the leases of its members (a lease in use has a record in every
        batch that applies): from when (monotonic), their new expiry, and their ids. (Not
        every lease: two batches at once would each wait for the other's rows.)"""
        by_member = self._by_member
        ids = [by_member[m].lease_id for m in members if m in by_member]  # type: ignore[index]
        return time.monotonic(), self._clock.now_s() + LEASE_TTL_S, ids

    def renewed(self, at_s: float, lease_ids: list[str]) -> None:
        ids = set(lease_ids)
        for lease in self._by_member.values():
            if lease.lease_id in ids:
                lease.renewed_at_s = max(lease.renewed_at_s, at_s)

    def restart_at(self, seq: int) -> None:
        """The journal was replayed: number the next record after `seq`."""
        self._seq = seq

    @property
    def last_seq(self) -> int:
        return self._seq

    def after_apply(self) -> None:
        if not self._queue and self.journal.size_bytes > JOURNAL_SIZE_MAX_BYTES:
            self.journal.truncate()  # every record in it is in the tables


def journal_name(path: str) -> str:
    """A journal's key in `journals_applied`: its absolute path and an id kept beside it
    (`<path>.id`, made at the journal's first use). Not the host's name: a host renamed (a
    container started again on the same volume) would replay records already applied."""
    id_path = Path(path + ".id")
    try:
        journal_id = id_path.read_text().strip()
    except FileNotFoundError:
        journal_id = secrets.token_hex(8)
        written = id_path.with_suffix(".id-new")
        written.write_text(journal_id + "\n")
        os.replace(written, id_path)  # whole or not at all
    return f"{os.path.abspath(path)}#{journal_id}"


def statements_in_order(statements: Iterable[Statement]) -> list[tuple[str, list[Any]]]:
    """Statements with each statement's rows together (one round trip each), in an order that
    gives what running them one by one gives: inserts first (a later update may touch a row
    they add), lease returns last (a step that moved a lease before its return moves it, and a
    return takes out what is left, so the windows end the same), the others in the order they
    first came; all of them add or subtract, so their order does not matter. The batches send
    their held writes (batches.py `_Held`) and the journal's records so."""
    rows_by_sql: dict[str, list[Any]] = {}
    for sql, params in statements:
        rows_by_sql.setdefault(sql, []).append(params)

    def rank(sql: str) -> int:
        return 0 if sql.lstrip().upper().startswith("INSERT") else 2 if sql == RETURN_SQL else 1

    return sorted(rows_by_sql.items(), key=lambda item: rank(item[0]))


class _Recorder:
    """A `Tx` that keeps the statements written to it (SqlStore's SQL for the request rows)."""

    def __init__(self) -> None:
        self.statements: list[Statement] = []

    async def execute(self, sql: str, params: object = ()) -> int:
        self.statements.append((sql, list(params)))  # type: ignore[call-overload]
        return 1


def _recorded(write: object, *args: object) -> list[Statement]:
    """The statements one of SqlStore's writes sends, run against a recorder: its coroutine
    never awaits anything else, so it finishes in one step."""
    recorder = _Recorder()
    coroutine = write(recorder, *args)  # type: ignore[operator]
    try:
        coroutine.send(None)
    except StopIteration:
        return recorder.statements
    coroutine.close()
    raise AssertionError("a recorded write awaited something")


def _add_used(lease: Lease, used_nanos: int) -> None:
    """The lease's view of its windows after a settlement posted `used_nanos` in them."""
    for kind, window in lease.stored.items():
        lease.stored[kind] = Window(
            kind,
            window.started_at_s,
            window.ends_at_s,
            0,
            window.used_nanos + used_nanos,
            window.reserved_nanos,
        )
