"""The embedded store: one SQLite file in WAL mode through aiosqlite, migrated on open.

All statements run on aiosqlite's single connection thread; a transaction is one `async with
self._tx()` block under an asyncio lock, so no other coroutine's statement can interleave with it.
Write transactions use BEGIN IMMEDIATE: check-and-act happens under SQLite's write lock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import aiosqlite

from proxy.metering import Usage
from proxy.store.base import OrgSpec, RequestRecord, Reservation, Seat, Settlement


class SqliteStore:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        store = cls(conn)
        await store._migrate()
        return store

    async def _migrate(self) -> None:
        folder = resources.files("proxy.store") / "migrations" / "sqlite"
        scripts = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
        async with self._tx():
            row = await (await self._conn.execute("PRAGMA user_version")).fetchone()
            version = row[0]
            for script in scripts:
                number = int(script.name.split("_", 1)[0])
                if number > version:
                    for statement in script.read_text().split(";\n"):
                        if statement.strip():
                            await self._conn.execute(statement)
                    await self._conn.execute(f"PRAGMA user_version = {number}")

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def find_seat(self, key_sha256: str) -> Seat | None:
        rows = await self._read(
            """SELECT m.id, m.org_id, m.email, m.role, m.tier, o.plan, o.timezone
               FROM keys k JOIN members m ON m.id = k.member_id JOIN orgs o ON o.id = m.org_id
               WHERE k.key_sha256 = ? AND k.revoked_at_s IS NULL AND m.removed = 0""",
            (key_sha256,),
        )
        return Seat(*rows[0]) if rows else None

    async def reserve(self, reservation: Reservation) -> None:
        r = reservation
        async with self._tx() as db:
            await db.execute(
                """INSERT INTO requests (id, member_id, org_id, model, stream, status,
                       reserved_nanos, created_at_s, expires_at_s)
                   VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)""",
                (
                    r.request_id,
                    r.member_id,
                    r.org_id,
                    r.model,
                    int(r.stream),
                    r.reserved_nanos,
                    r.created_at_s,
                    r.expires_at_s,
                ),
            )

    async def settle(self, settlement: Settlement) -> bool:
        s = settlement
        usage = s.usage or Usage()
        async with self._tx() as db:
            cursor = await db.execute(
                """UPDATE requests SET status = ?, input_tokens = ?, output_tokens = ?,
                       cache_creation_5m_input_tokens = ?, cache_creation_1h_input_tokens = ?,
                       cache_read_input_tokens = ?, web_search_requests = ?, speed = ?,
                       output_estimated = ?, cost_nanos = ?, upstream_status = ?, outcome = ?,
                       settled_at_s = ?, upstream_ms = ?, duration_ms = ?
                   WHERE id = ? AND status = 'pending'""",
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
                    s.upstream_status,
                    s.outcome,
                    s.settled_at_s,
                    s.upstream_ms,
                    s.duration_ms,
                    s.request_id,
                ),
            )
            return cursor.rowcount == 1

    async def expire_pending(self, now_s: float) -> int:
        async with self._tx() as db:
            cursor = await db.execute(
                """UPDATE requests SET status = 'expired', outcome = 'expired', settled_at_s = ?
                   WHERE status = 'pending' AND expires_at_s <= ?""",
                (now_s, now_s),
            )
            return cursor.rowcount

    async def get_request(self, request_id: str) -> RequestRecord | None:
        rows = await self._read("SELECT * FROM requests WHERE id = ?", (request_id,))
        return _request_record(rows[0]) if rows else None

    async def recent_requests(self, limit: int) -> list[RequestRecord]:
        rows = await self._read(
            "SELECT * FROM requests ORDER BY created_at_s DESC, rowid DESC LIMIT ?", (limit,)
        )
        return [_request_record(row) for row in rows]

    async def _read(self, sql: str, params: tuple = ()) -> list[aiosqlite.Row]:
        async with self._lock:
            cursor = await self._conn.execute(sql, params)
            return list(await cursor.fetchall())

    async def apply_orgs(self, orgs: list[OrgSpec], now_s: float) -> None:
        async with self._tx() as db:
            declared = {row[0]: row[1] async for row in await db.execute("SELECT * FROM declared")}

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
                for column, value in (
                    ("plan", org.plan),
                    ("timezone", org.timezone),
                    ("extra_usage", org.extra_usage),
                ):
                    if await changed(f"org/{org.id}/{column}", value):
                        await db.execute(
                            f"UPDATE orgs SET {column} = ? WHERE id = ?", (value, org.id)
                        )
                for m in org.members:
                    await db.execute(
                        "INSERT INTO members (org_id, email, role, tier, created_at_s) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (org_id, email) DO NOTHING",
                        (org.id, m.email, m.role, m.tier, now_s),
                    )
                    row = await (
                        await db.execute(
                            "SELECT id FROM members WHERE org_id = ? AND email = ?",
                            (org.id, m.email),
                        )
                    ).fetchone()
                    member_id = row[0]
                    selected = org.extra_usage == "selected" and m.email in org.extra_usage_members
                    for column, value in (
                        ("role", m.role),
                        ("tier", m.tier),
                        ("extra_usage_consent", m.extra_usage_consent),
                        ("extra_usage_enabled", int(selected)),
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

    async def issue_key(self, member_id: int, key_sha256: str, prefix: str, now_s: float) -> None:
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO keys (key_sha256, member_id, prefix, created_at_s) "
                "VALUES (?, ?, ?, ?)",
                (key_sha256, member_id, prefix, now_s),
            )

    async def revoke_key(self, prefix_or_sha256: str, now_s: float) -> int:
        async with self._tx() as db:
            cursor = await db.execute(
                "UPDATE keys SET revoked_at_s = ? WHERE (prefix = ? OR key_sha256 = ?) "
                "AND revoked_at_s IS NULL",
                (now_s, prefix_or_sha256, prefix_or_sha256),
            )
            return cursor.rowcount

    async def ping(self) -> None:
        async with self._lock:
            await self._conn.execute("SELECT 1")

    async def close(self) -> None:
        await self._conn.close()


def _request_record(row: aiosqlite.Row) -> RequestRecord:
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
    )
