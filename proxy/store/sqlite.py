"""The embedded backend: one SQLite file in WAL mode through aiosqlite, migrated on open.

All statements run on aiosqlite's single connection thread; a transaction holds an asyncio lock,
so no other coroutine's statement can interleave with it, and BEGIN IMMEDIATE takes SQLite's write
lock at once: every write transaction runs alone, which is what `Tx.lock_org` asks for.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.store.sql import SqlStore


async def open_sqlite(path: str) -> SqlStore:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = aiosqlite.Row
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "foreign_keys=ON",
        "busy_timeout=5000",
    ):
        await conn.execute(f"PRAGMA {pragma}")
    db = SqliteDatabase(conn)
    await db.migrate()
    return SqlStore(db)


class SqliteTx:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self._conn.execute(sql, params)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._conn.execute_fetchall(sql, params))

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any | None:
        rows = await self._conn.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def lock_org(self, org_id: str) -> None:
        """The transaction holds the database's write lock already."""

    async def lock_named(self, name: str) -> None:
        """The transaction holds the database's write lock already."""


class SqliteDatabase:
    slice_start_sql = "CAST({instant} / {slice_s} AS INTEGER) * {slice_s}"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteTx(self._conn)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[SqliteTx]:
        async with self._lock:
            yield SqliteTx(self._conn)

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
        await self._conn.close()


def _statements(script: str) -> list[str]:
    """Split a migration into statements (sqlite3 decides where each one is complete)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements
