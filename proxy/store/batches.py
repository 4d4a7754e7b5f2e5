"""Group commit for the PostgreSQL store: the admissions and settlements that arrive while one
batch runs go together into the next, one transaction for all of them.

A step on its own costs a dozen round trips to the server (BEGIN, the seat locked, the books,
each write, COMMIT), and at a few hundred a second those round trips were most of the proxy's CPU
(docs/performance.md). A batch of steps, in one transaction:

1. locks and reads what its steps need in one statement (`_BOOKS_SQL`): the requests to settle
   and the members' seats (both `FOR UPDATE`, members in id order), with the members' newest
   windows and the month's spend. Rows another transaction holds are skipped (`SKIP LOCKED`):
   their steps run alone, each in a transaction of its own that waits for them, as every step
   did before batches, so that a member whose row another replica (or an admin) holds stalls
   no one else;
2. decides each step in turn with `SqlStore`'s own code, against that copy of the books
   (books.py `Copy`), which each write keeps in step; the writes are held back;
3. sends the held writes, all rows of one statement at once (asyncpg's `executemany` is one round
   trip): inserts first, since a later update of the batch may touch a window an earlier step's
   insert opened, then updates, each statement's rows in step order. Updates move amounts
   (`used = used + ?`) or set a row one step owns, so only the inserts' order matters;
4. commits, and only then answers its steps.

A read the copy cannot answer (windows of the past, the `expected` reservation's recent
requests, the month's reloads) is sent after the writes held so far, so it sees them. An org's
money is locked when a step first moves it (`lock_org`) and read again under the lock. A batch
that loses a deadlock or serialization race runs again whole; one that fails otherwise runs
again one step at a time, so that a step that cannot succeed fails alone. Two batches may run
at once in a process, on members the other does not have (`_start_batches`): a request's
settlement does not hold up the next request's admission of another member, and while both
run, the next batch gathers. A step whose caller is cancelled still runs to its end, and the
caller learns what it did (`to_its_end`).

Given a journal, the store decides most admissions and settlements on included quota from
leases, in memory (leases.py), and a batch does two more things: it applies first the
journal's records of its members (and of any member no other running batch has), and after its
steps it takes leases for the members it admitted on included quota.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import structlog

from proxy.ledger import INCLUDED, SESSION, Admitted, Months, Window, month_of, next_month
from proxy.settings import Tier
from proxy.store.base import (
    Admission,
    AdmissionRequest,
    MemberStatus,
    Settled,
    Settlement,
    StoreUnavailable,
)
from proxy.store.books import Copy, _money_of
from proxy.store.journal import Journal, read_records
from proxy.store.leases import (
    APPLIED_SQL,
    APPLY_AFTER_S,
    EXPIRE_SQL,
    LEASE_TTL_S,
    RENEW_SQL,
    Lease,
    Leases,
    Queued,
    journal_name,
    statements_in_order,
)
from proxy.store.sql import (
    _SEAT_COLUMNS,
    _SEAT_JOINS,
    RETRIES_MAX,
    Pending,
    SqlStore,
    _SeatRow,
    to_its_end,
)
from proxy.tasks import Tasks

if TYPE_CHECKING:
    from proxy.store.postgres import PostgresDatabase, PostgresTx

log = structlog.get_logger("proxy.store")
R = TypeVar("R")

# A batch takes at most this many waiting steps; the rest wait for the next.
BATCH_STEPS_MAX = 64
# How far a time zone's clock is from UTC, at most (UTC-12 to UTC+14): the months to read.
ZONE_OFFSET_MAX_S = 14 * 3600
# At most this many batches run at once, on members that no other running batch has.
BATCHES_RUNNING_MAX = 2
# The answer of a step its batch leaves to a transaction of its own.
_ALONE = object()


@dataclass(slots=True)  # built for every step: not frozen (ledger.py says why)
class _Waiting:
    """A step waiting for its batch: an admission or a settlement, and its answer to come."""

    step: AdmissionRequest | Settlement
    member_id: int | None  # None: not known (a settlement retried)
    tiers: Mapping[str, Tier]
    answer: asyncio.Future[Any]


def _gives_leases_back(step: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    async def run(store: BatchedStore, *args: Any, **kwargs: Any) -> R:
        try:
            return await step(store, *args, **kwargs)
        finally:
            if store.leases is not None:
                store.leases.give_back_all()
                store._records_written()

    run.__name__ = run.__qualname__ = step.__name__
    run.__doc__ = step.__doc__
    return run


async def _apply(tx: PostgresTx, records: list[Queued], journal: str) -> None:
    """Run the journal's records (in the batch's transaction), each statement's rows at once
    (`statements_in_order`), and record the last one's number with them. A record that breaks
    a constraint can never apply (a bug): then each runs alone, and those that fail are logged
    and left out."""
    try:
        async with tx.savepoint():
            for sql, rows in statements_in_order(st for r in records for st in r.statements):
                await tx.executemany(sql, rows)
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError):
        for record in records:
            try:
                async with tx.savepoint():
                    for sql, params in record.statements:
                        await tx.execute(sql, params)
            except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
                log.error("journal_record_failed", seq=record.seq, error=str(exc))
    await tx.execute(APPLIED_SQL, (journal, records[-1].seq))


class BatchedStore(SqlStore):
    """`SqlStore` on PostgreSQL with admissions and settlements committed in batches (the
    counters below say how many: /metrics reads them, metrics.py), and, given a journal file,
    decided in memory from leases (leases.py) wherever they can be."""

    def __init__(self, db: PostgresDatabase, journal: Journal | None = None) -> None:
        super().__init__(db)
        self._pg = db
        self._waiting: list[_Waiting] = []
        self._busy: set[int | None] = set()  # the members of the batches running
        self._running = 0  # batches
        self._admitted: dict[str, int] = {}  # request id -> member, until its settlement
        self._tasks = Tasks()
        self.leases = (
            Leases(self, journal, journal_name(journal.path)) if journal is not None else None
        )
        self._apply_timer: asyncio.TimerHandle | None = None
        self._apply_wanted = False  # the records waiting are due: a batch applies them
        self._renew_timer: asyncio.TimerHandle | None = None
        self._renew_wanted = False  # the leases are due for renewal: a batch renews them
        self._applied_seq = 0  # the journal's last record in the tables
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self.batches_committed = 0
        self.steps_committed = 0
        self.steps_alone = 0  # left by their batch to a transaction of their own
        self.steps_leased = 0  # decided in memory from a lease (leases.py)

    async def admit(self, request: AdmissionRequest, tiers: Mapping[str, Tier]) -> Admission:
        leases = self.leases
        if leases is not None:
            from_lease = leases.admit(request, tiers)
            if from_lease is not None:
                self.steps_leased += 1
                self._records_written()
                return from_lease
        admission: Admission = await self._in_batch(request, request.member_id, tiers)
        if isinstance(admission.decision, Admitted):
            self._admitted[request.request_id] = request.member_id
        return admission

    async def settle(self, settlement: Settlement, tiers: Mapping[str, Tier]) -> Settled | None:
        request_id = settlement.request_id
        leases = self.leases
        if leases is not None:
            from_lease = leases.settle(settlement)
            if from_lease is not None:
                self._admitted.pop(request_id, None)  # admitted from a lease in a batch's wait
                self.steps_leased += 1
                self._records_written()
                return from_lease
            member_id = leases.member_of(request_id)
            if member_id is not None:
                self._admitted[request_id] = member_id
        # the member, kept until the settlement is in (a retry after a failure knows it too)
        settled: Settled | None = await self._in_batch(
            settlement, self._admitted.get(request_id), tiers
        )
        self._admitted.pop(request_id, None)
        return settled

    async def _in_batch(
        self, step: AdmissionRequest | Settlement, member_id: int | None, tiers: Mapping[str, Tier]
    ) -> Any:
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(step, member_id, tiers, answer))
        self._start_batches()
        return await to_its_end(answer)

    def _start_batches(self) -> None:
        """While fewer than BATCHES_RUNNING_MAX run, start one with the waiting steps of members
        that no running batch has, up to BATCH_STEPS_MAX, in the order they came: the batches
        of one process never find each other's rows held, and a member's steps keep their
        order. A settlement whose member is not known here (a retried one: member None)
        counts as one more member. Each batch applies first the journal's records of members
        no other running batch has (a batch of records alone once they are due), after giving
        back the leases of the members it admits."""
        if self.leases is not None and self.leases.held and self._waiting:
            self._waiting = self._decided_from_leases(self._waiting)
        while self._running < BATCHES_RUNNING_MAX:
            batch: list[_Waiting] = []
            later: list[_Waiting] = []
            for waiting in self._waiting:
                ready = waiting.member_id not in self._busy and len(batch) < BATCH_STEPS_MAX
                (batch if ready else later).append(waiting)
            records: list[Queued] = []
            renewed: set[int] = set()
            if self.leases is not None and (batch or self._apply_wanted or self._renew_wanted):
                for waiting in batch:  # the exact decision counts their headroom as free
                    if isinstance(waiting.step, AdmissionRequest):
                        self.leases.give_back(waiting.step.member_id)
                records = self.leases.take_records(self._busy)
                self._apply_wanted = self.leases.records_waiting  # left for a later batch
                if self._renew_wanted:
                    renewed = self.leases.held_by(self._busy)
                    self._renew_wanted = False
            if not batch and not records and not renewed:
                return
            self._waiting = later
            members = {waiting.member_id for waiting in batch}
            members.update(record.member_id for record in records)
            members.update(renewed)
            self._busy |= members
            self._running += 1
            self._tasks.spawn(self._run(batch, members, records), name="store batch")

    def _decided_from_leases(self, waiting: list[_Waiting]) -> list[_Waiting]:
        """Answer the waiting admissions that a lease taken meanwhile can decide (they came
        while a batch took it); the others wait, and a member's admissions keep their order."""
        assert self.leases is not None
        left: list[_Waiting] = []
        exact: set[int | None] = set()  # members with an admission the lease could not decide
        for w in waiting:
            step = w.step
            if isinstance(step, AdmissionRequest) and step.member_id not in exact:
                admission = self.leases.admit(step, w.tiers)
                if admission is not None:
                    self.steps_leased += 1
                    self._records_written()
                    w.answer.set_result(admission)
                    continue
                exact.add(step.member_id)
            left.append(w)
        return left

    async def _run(
        self, batch: list[_Waiting], members: set[int | None], records: list[Queued]
    ) -> None:
        try:
            await self._commit(batch, records, members)
        except BaseException as exc:  # cancelled (the loop is closing): no step waits forever
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(StoreUnavailable(f"the store stopped: {exc!r}"))
            raise
        finally:
            self._busy -= members
            self._running -= 1
        self._start_batches()

    async def _commit(
        self, batch: list[_Waiting], records: list[Queued], members: set[int | None]
    ) -> None:
        """Answer every step of the batch: in one transaction, or (see `_alone`) on its own.
        The records go in with the steps; if the steps cannot, without them."""
        for attempt in range(1, RETRIES_MAX + 1):
            try:
                answers, leases_taken, within = await self._once(batch, records, members)
            except Exception as exc:
                if attempt < RETRIES_MAX and self._pg.retryable(exc):
                    log.info("transaction_retried", step="batch", attempt=attempt)
                    await asyncio.sleep(0.001 * 2**attempt)
                    continue
                if batch and records and not isinstance(exc, StoreUnavailable):
                    await self._commit([], records, members)  # the steps below run after them
                    records = []
                elif records:
                    self._unapplied(records, exc)
                if len(batch) > 1 and not isinstance(exc, StoreUnavailable):
                    answers = [_ALONE] * len(batch)  # a step that cannot succeed fails alone
                    break
                for waiting in batch:
                    waiting.answer.set_exception(exc)
                return
            self._applied(records, leases_taken)
            self.batches_committed += 1
            self.steps_committed += sum(answer is not _ALONE for answer in answers)
            break
        for waiting, answer in zip(batch, answers, strict=True):
            if answer is _ALONE:
                self.steps_alone += 1
                self._tasks.spawn(self._alone(waiting), name="store step")
            else:
                self._settled_exactly(answer, within)
                waiting.answer.set_result(answer)

    async def _once(
        self, batch: list[_Waiting], records: list[Queued], members: set[int | None]
    ) -> tuple[list[Any], list[Lease], set[str]]:
        """The batch's transaction: the journal's records first, then each step's answer, or
        _ALONE for a step it did not run; the leases it took, and the settlements on included
        quota that cost no more than their reservation."""
        leases = self.leases
        leases_taken: list[Lease] = []
        answers: list[Any] = []
        within: set[str] = set()
        renewed_at_s, expires_at_s, lease_ids = (
            leases.renewing(members) if leases is not None else (0.0, 0.0, [])
        )
        async with self._pg.kept_transaction() as tx:
            if leases is not None and records:
                await _apply(tx, records, leases.name)
            if lease_ids:
                await tx.execute(RENEW_SQL, (expires_at_s, lease_ids))
            if batch:
                books = _Batch(self._pg, tx, self._months)
                locked = await books.lock([waiting.step for waiting in batch])
                for waiting, ready in zip(batch, locked, strict=True):
                    held = books.pending_of(waiting.step)
                    answer = await _run_step(books, waiting) if ready else _ALONE
                    answers.append(answer)
                    if (
                        held is not None
                        and isinstance(answer, Settled)
                        and held.billing == INCLUDED
                    ):
                        split = answer.split
                        cost_nanos = split.included_nanos + split.extra_nanos + split.overrun_nanos
                        if cost_nanos <= held.reserved_nanos:
                            within.add(answer.request_id)
                if leases is not None:
                    leases_taken = await books.take_leases(leases, batch, answers)
                await books.held.send()
        if leases is not None and lease_ids:
            leases.renewed(renewed_at_s, lease_ids)
        return answers, leases_taken, within

    # -- the journal of the steps decided from leases

    def _records_written(self) -> None:
        """A step decided from a lease wrote its record: a batch applies it within
        APPLY_AFTER_S."""
        if self._apply_timer is None:
            loop = asyncio.get_running_loop()
            self._apply_timer = loop.call_later(APPLY_AFTER_S, self._apply_due)

    def _apply_due(self) -> None:
        self._apply_timer = None
        assert self.leases is not None
        self._apply_wanted = self.leases.records_waiting
        self._start_batches()

    def _renew_due(self) -> None:
        """Every LEASE_TTL_S / 4 while leases are held: a batch renews those of members no
        running batch has (the others' batches renew theirs), and idle ones go back."""
        self._renew_timer = None
        assert self.leases is not None
        self.leases.give_back_idle()
        if self.leases.records_waiting:
            self._records_written()
        self._renew_wanted = True
        self._start_batches()
        self._renewing()

    def _renewing(self) -> None:
        if self._renew_timer is None and self.leases is not None and self.leases.held:
            loop = asyncio.get_running_loop()
            self._renew_timer = loop.call_later(LEASE_TTL_S / 4, self._renew_due)

    def _applied(self, records: list[Queued], leases_taken: list[Lease]) -> None:
        leases = self.leases
        if leases is None:
            return
        for lease in leases_taken:
            leases.hold(lease)
        self._renewing()
        if records:
            self._applied_seq = max(self._applied_seq, records[-1].seq)
            leases.after_apply()
        self._wake_flushes(None)
        if leases.records_waiting:
            self._records_written()

    def _unapplied(self, records: list[Queued], exc: BaseException) -> None:
        """The records did not reach the tables: they wait, and are tried again."""
        assert self.leases is not None
        self.leases.unapplied(records)
        log.warning("journal_apply_failed", records=len(records), error=str(exc))
        self._wake_flushes(exc if isinstance(exc, StoreUnavailable) else None)
        self._records_written()

    def _wake_flushes(self, failure: BaseException | None) -> None:
        waiting, self._flushes = self._flushes, []
        for seq, done in waiting:
            if done.done():
                continue
            if seq <= self._applied_seq:
                done.set_result(None)
            elif failure is not None:
                done.set_exception(failure)
            else:
                self._flushes.append((seq, done))

    async def flush(self) -> None:
        """Wait until every record written so far is in the tables (a read sees them)."""
        leases = self.leases
        if leases is None or leases.last_seq <= self._applied_seq:
            return
        done = asyncio.get_running_loop().create_future()
        self._flushes.append((leases.last_seq, done))
        self._apply_wanted = True
        self._start_batches()
        await done

    async def replay(self) -> None:
        """At start-up: apply what the journal holds past its last record in the tables."""
        leases = self.leases
        if leases is None:
            return
        records = read_records(leases.journal.path)
        async with self._pg.kept_transaction() as tx:
            row = await tx.fetchrow(
                "SELECT seq FROM journals_applied WHERE journal = ?", (leases.name,)
            )
            applied_seq = row[0] if row else 0
            waiting = [Queued(seq, 0, st) for seq, st in records if seq > applied_seq]
            if waiting:
                await _apply(tx, waiting, leases.name)
                log.info("journal_replayed", records=len(waiting), last_seq=waiting[-1].seq)
        last_seq = max([applied_seq, *(seq for seq, _ in records)])
        leases.restart_at(last_seq)
        self._applied_seq = last_seq
        leases.journal.truncate()

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        await self.flush()  # a read sees the steps this replica acknowledged
        return await super()._read(sql, params)

    async def member_status(
        self, member_id: int, tiers: Mapping[str, Tier], now_s: float
    ) -> MemberStatus:
        await self.flush()
        status = await super().member_status(member_id, tiers, now_s)
        return await self._leases_left_out(member_id, status)

    async def continue_extra_usage(
        self, member_id: int, tiers: Mapping[str, Tier], now_s: float
    ) -> MemberStatus:
        await self.flush()
        status = await super().continue_extra_usage(member_id, tiers, now_s)
        return await self._leases_left_out(member_id, status)

    async def _leases_left_out(self, member_id: int, status: MemberStatus) -> MemberStatus:
        """The status with the windows' reserved amounts those of the requests in flight: the
        leases that any replica holds in them are headroom set aside, not spent."""
        rows = await super()._read(
            "SELECT session_started_at_s, weekly_started_at_s, amount_nanos FROM leases "
            "WHERE member_id = ?",
            (member_id,),
        )
        by_kind = dict(status.windows.by_kind)
        for kind, window in by_kind.items():
            leased_nanos = sum(
                amount
                for session_start, weekly_start, amount in rows
                if window.started_at_s == (session_start if kind == SESSION else weekly_start)
            )
            if leased_nanos:
                by_kind[kind] = replace(window, reserved_nanos=window.reserved_nanos - leased_nanos)
        return replace(status, windows=replace(status.windows, by_kind=by_kind))

    async def expire_pending(self, now_s: float) -> int:
        """Also end the leases no replica renewed (their replica stopped)."""
        async with self._pg.transaction() as tx:
            await tx.execute(EXPIRE_SQL, (now_s,))
        return await super().expire_pending(now_s)

    def _settled_exactly(self, answer: Any, within: set[str]) -> None:
        """A settlement decided in a batch: the member's lease sees what it posted. One that
        cost more than its reservation (an estimate short of the truth), or billed extra usage,
        may have left the windows less headroom than the lease holds: the lease goes back, and
        the next admission is decided exactly, as it would be without leases."""
        if self.leases is None or not isinstance(answer, Settled):
            return
        if answer.request_id in within:
            self.leases.posted(answer.member_id, answer.split.included_nanos)
        else:
            self.leases.give_back(answer.member_id)
            self._records_written()

    async def _alone(self, waiting: _Waiting) -> None:
        """A step in a transaction of its own, as `SqlStore` runs it: one whose rows another
        transaction holds (it waits for them on its own connection while batches go on), or
        one of a batch that failed."""
        try:
            answer = await _run_step(super(), waiting)
        except Exception as exc:
            waiting.answer.set_exception(exc)
        else:
            self._settled_exactly(answer, set())
            waiting.answer.set_result(answer)

    async def close(self) -> None:
        await self._tasks.drain()  # the batch running, and the steps waiting for the next
        leases = self.leases
        if leases is not None:
            leases.give_back_all()
            try:
                await self.flush()
            except StoreUnavailable as exc:  # the records stay in the journal for the next start
                log.error("journal_not_applied_at_close", error=str(exc))
            for timer in (self._apply_timer, self._renew_timer):
                if timer is not None:
                    timer.cancel()
            leases.journal.close()
            self.leases = None  # closing twice closes nothing more
        await super().close()

    # Admin changes made here reach this replica's leases at once (they reach the other
    # replicas' within LEASE_AGE_MAX_S): each gives the leases back.
    apply_orgs = _gives_leases_back(SqlStore.apply_orgs)
    update_org = _gives_leases_back(SqlStore.update_org)
    set_tier_limit = _gives_leases_back(SqlStore.set_tier_limit)
    update_member = _gives_leases_back(SqlStore.update_member)
    remove_member = _gives_leases_back(SqlStore.remove_member)
    revoke_key = _gives_leases_back(SqlStore.revoke_key)


async def _run_step(store: SqlStore, waiting: _Waiting) -> Any:
    """The waiting step, run by `store`: its admission or its settlement."""
    if isinstance(waiting.step, AdmissionRequest):
        return await store.admit(waiting.step, waiting.tiers)
    return await store.settle(waiting.step, waiting.tiers)


class _Held:
    """The `Tx` the steps of a batch see: writes held back until `send`, reads sent after them."""

    def __init__(self, tx: PostgresTx, books: _Batch) -> None:
        self._tx = tx
        self._books = books
        self._writes: list[tuple[str, Sequence[Any]]] = []
        self._orgs_locked: set[str] = set()

    async def __aenter__(self) -> _Held:
        return self

    async def __aexit__(self, *_: object) -> None:
        """The batch's transaction commits (or rolls back) once every step has run."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._writes.append((sql, params))
        return 1  # not known yet; admission and settlement never ask

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._writes += [(sql, row) for row in rows]

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        await self.send()
        return await self._tx.fetch(sql, params)

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any | None:
        await self.send()
        return await self._tx.fetchrow(sql, params)

    async def lock_org(self, org_id: str) -> bool:
        """Lock the org's row once a batch; its money is then read again, under the lock."""
        if org_id in self._orgs_locked:
            return False
        await self.send()
        await self._tx.lock_org(org_id)
        self._orgs_locked.add(org_id)
        self._books._forget_org(org_id)
        return True

    async def lock_named(self, name: str) -> None:
        await self.send()
        await self._tx.lock_named(name)

    async def send(self) -> None:
        """The writes held so far, one round trip per statement: inserts first (see above)."""
        writes, self._writes = self._writes, []
        for sql, rows in statements_in_order(writes):
            await self._tx.executemany(sql, rows)


class _OneTransaction:
    """The `Database` the steps of a batch see: its one transaction, open across them."""

    yields_mid_transaction = False  # the batch runs to its end (BatchedStore._in_batch)

    def __init__(self, db: PostgresDatabase, held: _Held) -> None:
        self._db = db
        self._held = held

    def transaction(self) -> _Held:
        return self._held

    def for_update(self, tables: str) -> str:
        return self._db.for_update(tables)


class _Batch(Copy):
    """The books of one batch: read under the batch's locks, forgotten with it."""

    def __init__(self, db: PostgresDatabase, tx: PostgresTx, months: Months) -> None:
        self.held = _Held(tx, self)
        super().__init__(_OneTransaction(db, self.held))  # type: ignore[arg-type]
        self._tx = tx
        self._months = months  # the store's: a batch is too short to learn them again

    async def lock(self, steps: Sequence[AdmissionRequest | Settlement]) -> list[bool]:
        """Lock and read the books of the steps in one statement (`_BOOKS_SQL`); for each step,
        whether its rows are locked here. Rows another transaction holds are skipped (SKIP
        LOCKED), and so are requests no longer pending: those steps run on their own
        (`BatchedStore._alone`)."""
        settling = [s.request_id for s in steps if isinstance(s, Settlement)]
        admitting = sorted({s.member_id for s in steps if isinstance(s, AdmissionRequest)})
        instants_s = [_decided_at_s(s) for s in steps]
        rows = await self._tx.fetch(_BOOKS_SQL, (settling, admitting, _months_around(instants_s)))
        spent: dict[tuple[str, int, str], tuple[int, int]] = {}
        for row in rows:
            values = tuple(row)
            seat = self._seats[values[0]] = _SeatRow(*values[:_SEAT_FIELDS])
            self._money[seat.org_id] = _money_of(seat)
            pending, newest, spend = values[_SEAT_FIELDS:]
            for request_id, *recorded in pending:
                self._pending[request_id] = Pending(seat.member_id, *recorded)
            self._windows[seat.member_id] = {
                kind: Window(kind, started, ends, 0, used, held)
                for kind, started, ends, used, held in newest
            }
            for member_id, month, posted, held in spend:
                spent[(seat.org_id, member_id, month)] = (posted, held)
        locked = []
        for step in steps:  # the spend of the month each step decides in (none yet: zero)
            seat = self._seats.get(self._member_of(step))  # type: ignore[arg-type]
            locked.append(seat is not None)
            if seat is not None:
                month = self._months.of(_decided_at_s(step), seat.timezone)
                for key in ((seat.org_id, 0, month), (seat.org_id, seat.member_id, month)):
                    self._spent[key] = spent.get(key, (0, 0))
        return locked

    def pending_of(self, step: AdmissionRequest | Settlement) -> Pending | None:
        """What the admission of a request to settle held (before its settlement runs)."""
        return self._pending.get(step.request_id) if isinstance(step, Settlement) else None

    async def take_leases(
        self, leases: Leases, batch: list[_Waiting], answers: list[Any]
    ) -> list[Lease]:
        """Leases for the members this batch admitted on included quota and refused nothing
        (near a limit every step is decided here), sized on their books as the batch leaves
        them: their rows, and their amounts in the windows."""
        admitted: dict[int, tuple[_Waiting, Admission]] = {}
        refused: set[int] = set()
        for waiting, answer in zip(batch, answers, strict=True):
            step = waiting.step
            if isinstance(step, AdmissionRequest) and isinstance(answer, Admission):
                if isinstance(answer.decision, Admitted):
                    admitted[step.member_id] = (waiting, answer)
                else:
                    refused.add(step.member_id)
        taken = []
        for member_id, (waiting, admission) in admitted.items():
            seat, stored = self._seats.get(member_id), self._windows.get(member_id)
            if member_id in refused or seat is None or stored is None:
                continue
            if not leases.wants(member_id):
                continue
            step = waiting.step
            assert isinstance(step, AdmissionRequest)
            tier = waiting.tiers[seat.tier]
            offer = leases.offer(seat, tier, admission, stored, step.worst_case_nanos)
            if offer is None:
                continue
            lease, (sql, params) = offer
            await self.held.execute(sql, params)
            await self._move_windows(self.held, member_id, lease.starts, 0, lease.remaining_nanos)
            taken.append(lease)
        return taken

    def _forget_org(self, org_id: str) -> None:
        """Forget the org's money and month spend, and its members' seats (which carry them)."""
        self._money.pop(org_id, None)
        for member_id in [m for m, seat in self._seats.items() if seat.org_id == org_id]:
            del self._seats[member_id]
        for key in [key for key in self._spent if key[0] == org_id]:
            del self._spent[key]

    def _member_of(self, step: AdmissionRequest | Settlement) -> int | None:
        """A step's member; None for a request to settle that was not read here."""
        if isinstance(step, AdmissionRequest):
            return step.member_id
        pending = self._pending.get(step.request_id)
        return pending.member_id if pending else None


def _decided_at_s(step: AdmissionRequest | Settlement) -> float:
    """The instant a step decides at (its month is that instant's, in the org's time zone)."""
    return step.created_at_s if isinstance(step, AdmissionRequest) else step.settled_at_s


def _months_around(instants_s: Sequence[float]) -> list[str]:
    """Every calendar month any of these instants may fall in, in any time zone (UTC-12 to
    UTC+14): the months from the earliest instant's, 14 hours earlier, to the latest's, 14
    hours later, in UTC (a batch's instants are moments apart: one month or two)."""
    month = month_of(min(instants_s) - ZONE_OFFSET_MAX_S, "UTC")
    last = month_of(max(instants_s) + ZONE_OFFSET_MAX_S, "UTC")
    months = [month]
    while month < last:  # YYYY-MM: text order is time order
        month = next_month(month)
        months.append(month)
    return months


_SEAT_FIELDS = len(fields(_SeatRow))
# A batch's books in one statement: the requests to settle, then the members' rows (the
# admitting members', and the settling requests' members), each locked, members in id order;
# with each member, its requests to settle, its newest window of each kind and the month spend
# of its org (member 0) and of itself, in the months the batch's instants may fall in.
# Every row is found by its key: requests by id (whether still pending is asked after the
# lock: a plan that asked the "pending" index first read each of its dead entries, one for
# every settlement since the last vacuum), members by id (an `OR m.id IN (...)` read them
# all), and each newest window at the end of its key (DISTINCT ON read all of a member's
# windows, about five a day). A request no longer pending stays locked until the batch ends, and its step runs alone
# after it. tests/store/test_batches.py checks the plan.
_BOOKS_SQL = f"""
WITH asked AS (
    SELECT id, member_id, model, billing, reserved_nanos, extra_reserved_nanos, month,
        session_started_at_s, weekly_started_at_s, status
    FROM requests WHERE id = ANY(?::text[]) FOR UPDATE SKIP LOCKED
), settling AS (
    SELECT * FROM asked WHERE status = 'pending'
), seats ({", ".join(f.name for f in fields(_SeatRow))}) AS (
    SELECT {_SEAT_COLUMNS} FROM members m {_SEAT_JOINS}
    WHERE m.id = ANY(ARRAY(SELECT member_id FROM settling) || ?::bigint[])
    ORDER BY m.id FOR UPDATE OF m SKIP LOCKED
)
SELECT seats.*,
    ARRAY(SELECT ROW(r.id, r.model, r.billing, r.reserved_nanos, r.extra_reserved_nanos, r.month,
        r.session_started_at_s, r.weekly_started_at_s) FROM settling r
        WHERE r.member_id = seats.member_id),
    ARRAY(SELECT ROW(w.kind, w.started_at_s, w.ends_at_s, w.used_nanos, w.reserved_nanos)
        FROM (VALUES ('session'), ('weekly')) AS k (kind), LATERAL (SELECT * FROM windows
            WHERE member_id = seats.member_id AND kind = k.kind
            ORDER BY started_at_s DESC LIMIT 1) w),
    ARRAY(SELECT ROW(s.member_id, s.month, s.posted_nanos, s.reserved_nanos) FROM spend s
        WHERE s.org_id = seats.org_id AND s.member_id IN (0, seats.member_id)
            AND s.month = ANY(?::text[]))
FROM seats ORDER BY seats.member_id
"""
