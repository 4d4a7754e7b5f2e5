"""The embedded backend: one SQLite file in WAL mode, migrated on open.

Statements run on the event loop's own thread, straight through the standard library's sqlite3:
a statement on a local WAL file takes microseconds, far less than handing it to a worker thread
and back (aiosqlite's way: one hop per statement, measured at 1.3 ms an admission against 0.1 ms
this way; README "Performance"). A transaction holds an asyncio lock, so no other coroutine's
statement can interleave with it, and BEGIN IMMEDIATE takes SQLite's write lock at once: every
write transaction runs alone, which is what `Tx.lock_org` asks for. Another process writing the
same file (an `admin --config` run) can make a statement wait up to BUSY_TIMEOUT_MS.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.store.sql import SqlStore

BUSY_TIMEOUT_MS = 1000


async def open_sqlite(path: str) -> SqlStore:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    conn.row_factory = sqlite3.Row
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",  # WAL: a crash loses no committed transaction, only an OS crash may
        "foreign_keys=ON",
        f"busy_timeout={BUSY_TIMEOUT_MS}",
    ):
        conn.execute(f"PRAGMA {pragma}")
    db = SqliteDatabase(conn)
    await db.migrate()
    return SqlStore(db)


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

    async def lock_org(self, org_id: str) -> None:
        """The transaction holds the database's write lock already."""

    async def lock_named(self, name: str) -> None:
        """The transaction holds the database's write lock already."""


class SqliteDatabase:
    yields_mid_transaction = False
    slice_start_sql = "CAST({instant} / {slice_s} AS INTEGER) * {slice_s}"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        async with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[SqliteTx]:
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
        self._conn.close()


def _statements(script: str) -> list[str]:
    """Split a migration into statements (sqlite3 decides where each one is complete)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements
