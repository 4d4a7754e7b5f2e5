"""The shared backend: PostgreSQL through an asyncpg pool, for several proxy replicas.

Every replica runs the same SQL (store/sql.py). Steps on one member's windows run one at a time
across all replicas because each takes the member's row lock first, and money steps of one org
likewise under the org's row lock (`SELECT ... FOR UPDATE`, member before org); under READ
COMMITTED every later statement of that transaction then sees what the previous holder committed.
A transaction that still loses a race (deadlock, serialization failure) runs again (sql._atomic).
Admissions and settlements commit in batches, many steps in one transaction (batches.py), on
connections kept open for them beside the pool (`kept_transaction`: two at most); given a
journal file (`store.journal`), most are decided in memory from leases and reach the tables in
those batches (leases.py). A server that is down, a connection that dies and a pool with no free
connection within `store.pool_timeout_s` all become StoreUnavailable: the request fails with a
503, and fresh connections are opened for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog

from proxy.store.base import StoreUnavailable
from proxy.store.batches import BatchedStore
from proxy.store.journal import Journal

log = structlog.get_logger("proxy.store")

# What a lost or refused connection raises; a query's own errors (constraints...) are not here.
UNREACHABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    asyncpg.exceptions.TooManyConnectionsError,
)
RETRYABLE = (asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError)

IDENTITY_COLUMNS = (
    ("members", "id"),
    ("transfers", "id"),
    ("requests", "rowid"),
    ("alerts", "rowid"),
)

_PLACEHOLDER = re.compile(r"'[^']*'|\?(\d*)")

# Plan each statement once per connection: every statement the proxy sends is a lookup by key
# or along an index, and PostgreSQL's default plans `= ANY($1)` (the batches' reads) anew at
# each run, 0.2 ms each (docs/performance.md).
POOL_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}
# The batches' connections stay open for the process's life, and a plan made once is kept as
# long: one made while `requests` was nearly empty (a new database, before any ANALYZE) read the
# whole table at every batch once it had grown (2.1 ms a batch at 20,000 requests, 0.25 before).
# Their statements are all lookups by key, so they never want a sequential scan.
KEPT_SERVER_SETTINGS = {**POOL_SERVER_SETTINGS, "enable_seqscan": "off"}


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


async def open_postgres(
    url: str, *, pool_size: int, pool_timeout_s: float, journal_path: str = ""
) -> BatchedStore:
    """The store; with `journal_path`, it admits and settles from leases (leases.py), its
    steps written to that file first (a second process on the same file gets no leases)."""
    settings = {"statement_cache_size": 512, "timeout": pool_timeout_s}  # timeout: connecting
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=pool_size,
            reset=_keep_session,
            server_settings=POOL_SERVER_SETTINGS,
            **settings,
        )
    except UNREACHABLE as exc:
        raise StoreUnavailable(f"cannot connect to {safe_url(url)}: {exc}") from exc
    kept = partial(asyncpg.connect, url, server_settings=KEPT_SERVER_SETTINGS, **settings)
    db = PostgresDatabase(pool, pool_timeout_s, kept)
    journal = None
    try:
        await db.migrate()
        if journal_path:
            Path(journal_path).parent.mkdir(parents=True, exist_ok=True)
            journal = Journal.open(journal_path)
            if journal is None:
                log.warning("journal_held_elsewhere", journal=journal_path, leases="off")
        store = BatchedStore(db, journal)
        await store.replay()
    except BaseException:
        if journal is not None:
            journal.close()
        await db.close()
        raise
    return store


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool (asyncpg's default sends a reset
    query each time: one more round trip per transaction): every transaction ends in COMMIT or
    ROLLBACK, its locks are transaction-scoped, and no session setting is ever changed."""


def to_dollar_params(sql: str) -> str:
    """`?` placeholders (and SQLite's numbered `?2`) as PostgreSQL's `$n`."""
    counter = 0

    def number(match: re.Match[str]) -> str:
        nonlocal counter
        if match.group(0).startswith("'"):
            return match.group(0)  # a string literal stays as written
        if match.group(1):
            return f"${match.group(1)}"
        counter += 1
        return f"${counter}"

    return _PLACEHOLDER.sub(number, sql)


class PostgresTx:
    def __init__(self, conn: asyncpg.Connection, translated: dict[str, str]) -> None:
        self._conn = conn
        self._translated = translated

    def _sql(self, sql: str) -> str:
        found = self._translated.get(sql)
        if found is None:
            found = self._translated[sql] = to_dollar_params(sql)
        return found

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        status = await self._conn.execute(self._sql(sql), *params)
        # "UPDATE 3", "INSERT 0 1", "DELETE 0": the count is the last word
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) == 1:  # asyncpg's execute: 40 us of CPU, its executemany 49
            await self._conn.execute(self._sql(sql), *rows[0])
        else:
            await self._conn.executemany(self._sql(sql), rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._conn.fetch(self._sql(sql), *params)

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any | None:
        return await self._conn.fetchrow(self._sql(sql), *params)

    def savepoint(self) -> asyncpg.transaction.Transaction:
        """A savepoint in the transaction: what fails inside rolls back alone."""
        return self._conn.transaction()

    async def lock_org(self, org_id: str) -> bool:
        await self._conn.execute("SELECT 1 FROM orgs WHERE id = $1 FOR UPDATE", org_id)
        return True

    async def lock_named(self, name: str) -> None:
        await self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':' || $1))", name
        )


class PostgresDatabase:
    yields_mid_transaction = True
    slice_start_sql = "FLOOR({instant} / CAST({slice_s} AS DOUBLE PRECISION)) * {slice_s}"

    def __init__(
        self,
        pool: asyncpg.Pool,
        pool_timeout_s: float,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
    ) -> None:
        self._pool = pool
        self._pool_timeout_s = pool_timeout_s
        self._connect = connect  # a connection of the batches' own, set up as the pool's
        self._kept: list[asyncpg.Connection] = []  # the batches' connections, free
        self._translated: dict[str, str] = {}

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await self._pool.acquire(timeout=self._pool_timeout_s)
        except UNREACHABLE as exc:
            if isinstance(exc, asyncio.TimeoutError):
                raise StoreUnavailable(
                    f"no free store connection within {self._pool_timeout_s:g} s "
                    "(store.pool_size connections are busy)"
                ) from exc
            raise StoreUnavailable(f"the store is unreachable: {exc}") from exc
        try:
            yield conn
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"the store connection failed: {exc}") from exc
        finally:
            await self._pool.release(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        async with self._connection() as conn, conn.transaction():
            yield PostgresTx(conn, self._translated)

    @asynccontextmanager
    async def kept_transaction(self) -> AsyncIterator[PostgresTx]:
        """A transaction on a connection kept open for the batches (batches.py), outside the
        pool: a batch taking one from the pool and giving it back cost 0.13 ms and 80 us of CPU
        (the acquire's timeout and the release's shield each run a task; docs/performance.md).
        As many stay open as batches ran at once (BATCHES_RUNNING_MAX at most). One that was
        lost, or left in doubt, is closed, and the next batch opens another."""
        while self._kept:
            conn = self._kept.pop()
            if not conn.is_closed():  # closed by the server meanwhile: dropped
                break
        else:
            try:
                conn = await self._connect()
            except UNREACHABLE as exc:
                raise StoreUnavailable(f"the store is unreachable: {exc}") from exc
        try:
            async with conn.transaction():
                yield PostgresTx(conn, self._translated)
        except UNREACHABLE as exc:
            conn.terminate()
            raise StoreUnavailable(f"the store connection failed: {exc}") from exc
        except Exception:
            self._keep(conn)  # a query's error or the batch's own: rolled back
            raise
        except BaseException:
            conn.terminate()  # cancelled mid-query, say: whether it rolled back is not known
            raise
        else:
            self._keep(conn)

    def _keep(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed() or conn.is_in_transaction():
            conn.terminate()
        else:
            self._kept.append(conn)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[PostgresTx]:
        async with self._connection() as conn:
            yield PostgresTx(conn, self._translated)

    def for_update(self, tables: str) -> str:
        return f" FOR UPDATE OF {tables}"

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, RETRYABLE)

    async def columns(self, table: str) -> list[str]:
        async with self.reading() as tx:
            rows = await tx.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                "current_schema() AND table_name = ? ORDER BY ordinal_position",
                (table,),
            )
        return [row[0] for row in rows]

    async def after_copy(self, tx: PostgresTx) -> None:
        for table, column in IDENTITY_COLUMNS:
            await tx.fetch(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                f"(SELECT COALESCE(MAX({column}), 0) + 1 FROM {table}), false)"
            )

    async def migrate(self) -> None:
        """Apply the scripts not applied yet; replicas that start at once take turns."""
        folder = resources.files("proxy.store") / "migrations" / "postgresql"
        scripts = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':migrate'))"
            )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            version = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            for script in scripts:
                number = int(script.name.split("_", 1)[0])
                if number > version:
                    await conn.execute(script.read_text())  # no arguments: many statements
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", number
                    )

    async def ping(self) -> None:
        async with self.reading() as tx:
            await tx.fetch("SELECT 1")

    async def close(self) -> None:
        kept, self._kept = self._kept, []
        for conn in kept:  # idle, outside any transaction: nothing to finish
            with contextlib.suppress(*UNREACHABLE):
                await conn.close(timeout=self._pool_timeout_s)
        await self._pool.close()
