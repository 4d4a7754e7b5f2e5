"""The embedded backend: one SQLite file in WAL mode, migrated on open.

Statements run on the event loop's own thread, straight through the standard library's sqlite3:
a statement on a local WAL file takes microseconds, far less than handing it to a worker thread
and back (aiosqlite's way: one hop per statement; an admission and its settlement measured at
2.35 CPU ms that way and 0.74 this way; README "Storage"). A step holds an asyncio lock, so no
other coroutine's statement can interleave with it, and BEGIN IMMEDIATE takes SQLite's write lock
at once: every write runs alone, which is what `Tx.lock_org` asks for. The steps of one turn of
the event loop share one transaction, each in a savepoint, committed at the end of the turn
(group commit); a step returns only after that commit. Checkpoints run in a thread of their own
at a lower priority than the loop's, each followed by a short one with writes held so that the
WAL can start over. While another process holds the write lock (an `admin --config` run), a
step waits for it without blocking the loop, trying again for up to BUSY_TIMEOUT_MS, then fails
as the store being unavailable.

Admissions and settlements that `Books` (books.py) decides in memory are not steps here: their
statements are records of the write-behind journal (journal.py), which `write_behind` appends
and which reach the tables within APPLY_AFTER_S in one transaction (`_apply_now`), or at the
start of the next step or read, whichever comes first; replayed at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

from proxy.store.base import StoreUnavailable
from proxy.store.books import Books
from proxy.store.journal import Journal, Record, Statement, read_records
from proxy.store.sql import to_its_end

BUSY_TIMEOUT_MS = 1000
BUSY_RETRY_MS = (1, 50)  # the first wait for another process's write lock, and the longest
# The WAL is copied back into the database file (a checkpoint, with an fsync) by a thread of its
# own after this many commits, never on the event loop: SQLite's automatic checkpoint would run
# inside a COMMIT and stall every request for milliseconds (measured: 100 us a commit on
# average with it, 35 us without; single commits up to 21 ms).
CHECKPOINT_COMMITS = 500
# ... at a lower CPU priority than the loop's (Linux's nice, per thread): a checkpoint copies pages
# for tens of milliseconds, and on a busy core the loop's thread goes first (measured: with the
# proxy on one core, a 39 ms checkpoint delayed the first byte of the streams begun meanwhile to
# about 30 ms).
CHECKPOINT_NICE = 10
# After the WAL starts over, its file is cut back to this size (else it keeps its largest size).
WAL_SIZE_MAX_BYTES = 64 * 1024 * 1024
# The write-behind journal (journal.py) next to the database file: its records reach the tables
# within APPLY_AFTER_S, many in one transaction, or sooner when a step needs them there; the
# file starts over once it holds more than JOURNAL_SIZE_MAX_BYTES, all of it applied.
JOURNAL_SUFFIX = "-writes"
APPLY_AFTER_S = 0.01
JOURNAL_SIZE_MAX_BYTES = 1024 * 1024

log = structlog.get_logger("proxy.store")


async def open_sqlite(path: str) -> Books:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    conn.row_factory = sqlite3.Row
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",  # WAL: a crash loses no committed transaction, only an OS crash may
        "foreign_keys=ON",
        "busy_timeout=0",  # SQLite's own wait would block the loop: see SqliteDatabase._begin
        "wal_autocheckpoint=0",  # see CHECKPOINT_COMMITS
        f"journal_size_limit={WAL_SIZE_MAX_BYTES}",
    ):
        conn.execute(f"PRAGMA {pragma}")
    checkpointer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    checkpointer.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    journal = Journal.open(path + JOURNAL_SUFFIX) if path != ":memory:" else None
    db = SqliteDatabase(conn, checkpointer, journal)
    await db.migrate()
    await db.replay()
    return Books(db)


class SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._conn.execute(sql, params).fetchall()

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any | None:
        return self._conn.execute(sql, params).fetchone()

    async def lock_org(self, org_id: str) -> bool:
        """The transaction holds the database's write lock already: nothing read is stale."""
        return False

    async def lock_named(self, name: str) -> None:
        """The transaction holds the database's write lock already."""


class SqliteDatabase:
    yields_mid_transaction = False
    slice_start_sql = "CAST({instant} / {slice_s} AS INTEGER) * {slice_s}"

    def __init__(
        self,
        conn: sqlite3.Connection,
        checkpointer: sqlite3.Connection,
        journal: Journal | None = None,
    ) -> None:
        self.connection = self._conn = conn
        self.journal = journal  # None: another process owns it (or an in-memory database)
        self._queue: list[Record] = []  # journal records not yet applied to the tables
        self._applying: list[Record] = []  # applied in the open transaction, not committed yet
        self._seq = 0  # the number of the last record written
        self._apply_timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._checkpointer = checkpointer  # used by the one thread of self._checkpoints
        self._checkpoints = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sqlite-checkpoint", initializer=_in_background
        )
        self._commits = 0
        self._batch: asyncio.Future[None] | None = None  # the open write transaction's COMMIT
        self._checkpoint: asyncio.Future[None] | None = None
        self._finish_wanted = False  # frames were committed while the last checkpoint ran
        self._writes_held = False  # the checkpoint running is the finishing one
        self.steps = 0  # counted steps begun (books.py: did a step not its own run?)

    @asynccontextmanager
    async def transaction(self, *, counted: bool = True) -> AsyncIterator[SqliteTx]:
        """A step: a savepoint in the write transaction of this turn of the event loop, which
        commits once at the turn's end for every step that ran in it (group commit: one COMMIT,
        each changed page written once). The step returns once that commit is done. The
        journal's waiting records are applied first, so the step sees everything acknowledged."""
        async with self._lock:
            if self._batch is None and self._writes_held:
                assert self._checkpoint is not None
                await asyncio.wait([self._checkpoint])
            batch = self._batch if self._batch is not None else await self._begin()
            self._apply_queue()
            self.steps += counted
            self._conn.execute("SAVEPOINT step")
            try:
                yield SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK TO step")
                self._conn.execute("RELEASE step")
                raise
            self._conn.execute("RELEASE step")
        await to_its_end(batch)

    async def _begin(self) -> asyncio.Future[None]:
        """BEGIN IMMEDIATE, and the COMMIT at the end of this turn. While another process holds
        the write lock, try again after a growing pause rather than wait inside SQLite, which
        would stop every request and stream for as long."""
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + BUSY_TIMEOUT_MS / 1000
        pause_s, longest_s = (ms / 1000 for ms in BUSY_RETRY_MS)
        while (batch := self._try_begin()) is None:
            if loop.time() + pause_s > deadline_s:
                raise StoreUnavailable(
                    f"the SQLite store stayed locked by another process for {BUSY_TIMEOUT_MS} ms"
                )
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, longest_s)
        loop.call_soon(self._commit)
        return batch

    def _try_begin(self) -> asyncio.Future[None] | None:
        """BEGIN IMMEDIATE; None while another process holds the write lock."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            return None
        self._batch = asyncio.get_running_loop().create_future()
        return self._batch

    # -- the write-behind journal

    @property
    def records_waiting(self) -> bool:
        """Journal records not in the tables yet (a read of the tables would miss them)."""
        return bool(self._queue)

    def write_behind(self, statements: list[Statement]) -> None:
        """A step decided in memory (books.py): its record in the journal now, its statements
        in the tables within APPLY_AFTER_S, or at the next step that reads or writes them."""
        assert self.journal is not None
        seq = self._seq + 1
        self.journal.append(seq, statements)
        self._seq = seq
        self._queue.append((seq, statements))
        if self._apply_timer is None:
            loop = asyncio.get_running_loop()
            self._apply_timer = loop.call_later(APPLY_AFTER_S, self._apply_now)

    def _apply_queue(self) -> None:
        """In the open write transaction: run the journal's waiting records, in order, and
        record the last one's number with them. A record that breaks a constraint can never
        apply (a bug): it is logged and left out. Any other failure leaves them all waiting."""
        if not self._queue:
            return
        records, self._queue = self._queue, []
        execute = self._conn.execute
        execute("SAVEPOINT journal")
        try:
            try:
                for _, statements in records:
                    for sql, params in statements:
                        execute(sql, params)
            except sqlite3.IntegrityError:
                execute("ROLLBACK TO journal")
                self._apply_one_by_one(records)
            execute("UPDATE journal_applied SET seq = ?", (records[-1][0],))
        except sqlite3.Error as exc:
            execute("ROLLBACK TO journal")
            execute("RELEASE journal")
            self._queue[:0] = records
            raise StoreUnavailable(f"the SQLite store could not apply its journal: {exc}") from None
        execute("RELEASE journal")
        self._applying += records

    def _apply_one_by_one(self, records: list[Record]) -> None:
        """Each record in a savepoint of its own, leaving out those that break a constraint."""
        execute = self._conn.execute
        for seq, statements in records:
            execute("SAVEPOINT record")
            try:
                for sql, params in statements:
                    execute(sql, params)
            except sqlite3.IntegrityError as exc:
                execute("ROLLBACK TO record")
                log.error("journal_record_failed", seq=seq, error=str(exc))
            execute("RELEASE record")

    def _apply_now(self) -> None:
        """The journal's records have waited APPLY_AFTER_S: apply and commit them now, unless a
        step is waiting for the write lock (then try again later)."""
        self._apply_timer = None
        if not self._queue:
            return
        loop = asyncio.get_running_loop()
        if self._lock.locked() or self._writes_held:
            self._apply_timer = loop.call_later(APPLY_AFTER_S, self._apply_now)
            return
        try:
            batch = self._batch if self._batch is not None else self._try_begin()
        except sqlite3.Error as exc:  # the file cannot be written now: the records wait
            log.warning("journal_apply_failed", error=str(exc))
            batch = None
        if batch is None:  # another process writes, or the file cannot be written
            self._apply_timer = loop.call_later(APPLY_AFTER_S, self._apply_now)
            return
        try:
            self._apply_queue()
        except StoreUnavailable as exc:
            log.warning("journal_apply_failed", error=str(exc))
        self._commit()
        if batch.exception() is not None or self._queue:  # (marks the failure as seen)
            self._apply_timer = loop.call_later(APPLY_AFTER_S, self._apply_now)

    async def replay(self) -> None:
        """At start-up: apply the journal's records that a stopped process left unapplied."""
        if self.journal is None:
            return
        records = read_records(self.journal.path)
        applied_seq = self._conn.execute("SELECT seq FROM journal_applied").fetchone()[0]
        self._seq = max([applied_seq, *(seq for seq, _ in records)])
        self._queue = [record for record in records if record[0] > applied_seq]
        if self._queue:
            log.info("journal_replayed", records=len(self._queue), last_seq=self._seq)
            await self.flush()
        self.journal.truncate()

    async def flush(self) -> None:
        """Apply and commit every waiting record now (a reader in another process, such as
        a test, then sees it in the tables)."""
        if self._queue:
            async with self.transaction(counted=False):
                pass

    def _commit(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return  # close() committed it already
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("sqlite_commit_failed", error=str(exc))
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                self._conn.execute("ROLLBACK")
            self._queue[:0], self._applying = self._applying, []  # still to apply
            batch.set_exception(StoreUnavailable(f"the SQLite store could not commit: {exc}"))
            return
        batch.set_result(None)
        self._applying = []
        journal = self.journal
        if journal is not None and not self._queue and journal.size_bytes > JOURNAL_SIZE_MAX_BYTES:
            journal.truncate()  # every record in it is in the tables
        self._commits += 1
        if self._finish_wanted:
            self._finish_checkpoint()
        elif self._commits >= CHECKPOINT_COMMITS and self._checkpoint is None:
            self._commits = 0
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        self._checkpoint = asyncio.get_running_loop().run_in_executor(
            self._checkpoints, self._copy_back
        )
        self._checkpoint.add_done_callback(self._checkpointed)

    def _copy_back(self) -> None:
        """In a worker thread: PASSIVE copies what it can without waiting for, or blocking,
        the loop's connection."""
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        self._checkpoint = None
        finishing, self._writes_held = self._writes_held, False
        if done.cancelled() or done.exception() is not None:
            log.warning("sqlite_checkpoint_failed", error=str(done.exception()))
            return
        if finishing or not self._commits:
            return  # it copied every frame: the next write starts the WAL over
        # The loop committed while it ran, so the WAL cannot start over: under steady load it
        # would grow without end (15 KB a request was measured). Copy the rest, writes held,
        # right after the next commit (until then the WAL does not grow).
        self._finish_wanted = True

    def _finish_checkpoint(self) -> None:
        """Copy the frames committed since the last checkpoint began, while no write runs
        (`transaction` waits): only a checkpoint that copies every frame lets the next write
        start the WAL over. These are few; holding writes costs them a copy of a few pages and
        two fsyncs, once every CHECKPOINT_COMMITS commits, and the loop itself runs on."""
        self._finish_wanted = False
        self._writes_held = True
        self._start_checkpoint()

    def data_version(self) -> int:
        """Changes when another connection commits to the file (SQLite's `data_version`)."""
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[SqliteTx]:
        await self.flush()  # a read sees what the journal acknowledged
        async with self._lock:
            yield SqliteTx(self._conn)

    def for_update(self, tables: str) -> str:
        return ""  # BEGIN IMMEDIATE holds the write lock already

    def retryable(self, exc: BaseException) -> bool:
        return False  # transactions run one at a time: none can lose a race

    async def columns(self, table: str) -> list[str]:
        async with self.reading() as tx:
            return [row[1] for row in await tx.fetch(f"PRAGMA table_info({table})")]

    async def after_copy(self, tx: SqliteTx) -> None:
        """AUTOINCREMENT follows the largest id inserted by itself."""

    async def migrate(self) -> None:
        folder = resources.files("proxy.store") / "migrations" / "sqlite"
        scripts = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
        async with self.transaction() as tx:
            version = (await tx.fetchrow("PRAGMA user_version"))[0]
            for script in scripts:
                number = int(script.name.split("_", 1)[0])
                if number > version:
                    for statement in _statements(script.read_text()):
                        await tx.execute(statement)
                    await tx.execute(f"PRAGMA user_version = {number}")

    async def ping(self) -> None:
        async with self.reading() as tx:
            await tx.fetch("SELECT 1")

    async def close(self) -> None:
        self._commit()
        if self._apply_timer is not None:
            self._apply_timer.cancel()
        if self._queue:
            try:
                await self.flush()
            except StoreUnavailable as exc:  # the records stay in the journal for the next start
                log.error("journal_not_applied_at_close", records=len(self._queue), error=str(exc))
        if self.journal is not None:
            if not self._queue:
                self.journal.truncate()
            self.journal.close()
            self.journal = None  # closing twice closes nothing more
        while self._checkpoint is not None:  # a checkpoint's end may start its finishing one
            await asyncio.wait([self._checkpoint])
        self._checkpoints.shutdown()
        self._checkpointer.close()
        self._conn.close()  # the last connection to close checkpoints the rest


def _in_background() -> None:
    """The checkpoint thread's priority, lowered by CHECKPOINT_NICE (on Linux nice is a thread's
    own; elsewhere the call would lower the whole process's, so it is left alone)."""
    if sys.platform == "linux":
        thread = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, thread)  # the loop's, inherited
        os.setpriority(os.PRIO_PROCESS, thread, min(19, nice + CHECKPOINT_NICE))


def _statements(script: str) -> list[str]:
    """Split a migration into statements (sqlite3 decides where each one is complete)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements
