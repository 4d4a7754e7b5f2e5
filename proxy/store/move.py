"""`usage-proxy admin migrate-store`: copy a whole store into an empty one, then prove it equal.

Typically from the embedded SQLite file to PostgreSQL when a deployment grows to several
replicas. Run it with the proxy stopped: every table is copied in one transaction of the target
(all or nothing), ids and the continue-link secret included, so keys, links and statements go on
working; then both stores are compared (row counts, balances, transfer counts and sums) and the
target's ledger is verified.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.store.sql import SqlStore

# Parents before children (foreign keys), each with a stable order to page through.
TABLES = (
    ("orgs", "id"),
    ("members", "id"),
    ("keys", "key_sha256"),
    ("declared", "name"),
    ("tier_limits", "org_id, tier"),
    ("spend", "org_id, member_id, month"),
    ("windows", "member_id, kind, started_at_s"),
    ("requests", "rowid"),  # the insertion order that ties sort by
    ("transfers", "id"),
    ("alerts", "rowid"),
    ("secrets", "name"),
)
PAGE_ROWS = 5000

# Per org: the balance, and how many transfers there are and what they sum to.
LEDGER_SQL = (
    "SELECT o.id, o.balance_nanos, COUNT(t.id), CAST(COALESCE(SUM(t.amount_nanos), 0) AS BIGINT) "
    "FROM orgs o LEFT JOIN transfers t ON t.org_id = o.id GROUP BY o.id, o.balance_nanos "
    "ORDER BY o.id"
)


class MoveRefused(Exception):
    """The target is not empty (or the stores differ in a way that copying cannot fix)."""


@dataclass(frozen=True, slots=True)
class MoveReport:
    rows: dict[str, tuple[int, int]]  # table -> (rows in the source, rows in the target)
    ledger_equal: bool  # every org's balance, transfer count and sum equal in both
    mismatches: tuple[str, ...]  # what the target's own ledger check found

    @property
    def ok(self) -> bool:
        counts_equal = all(source == target for source, target in self.rows.values())
        return counts_equal and self.ledger_equal and not self.mismatches


async def move_store(source: SqlStore, target: SqlStore, now_s: float) -> MoveReport:
    src, dst = source.database, target.database
    async with dst.reading() as tx:
        if (await tx.fetchrow("SELECT COUNT(*) FROM orgs"))[0]:
            raise MoveRefused(
                "the target store already holds organisations; move into an empty one"
            )
    async with dst.transaction() as out:
        await out.execute("DELETE FROM secrets")  # the source's secret signs the links in use
        for table, order in TABLES:
            wanted = set(await dst.columns(table))
            columns = [c for c in await src.columns(table) if c in wanted]
            names = ", ".join(columns)
            insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})"
            offset = 0
            while True:
                async with src.reading() as read:
                    page = await read.fetch(
                        f"SELECT {names} FROM {table} ORDER BY {order} LIMIT ? OFFSET ?",
                        (PAGE_ROWS, offset),
                    )
                if not page:
                    break
                await out.executemany(insert, [tuple(row) for row in page])
                offset += len(page)
        await dst.after_copy(out)
    rows = {}
    for table, _ in TABLES:
        counts = []
        for db in (src, dst):
            async with db.reading() as read:
                counts.append((await read.fetchrow(f"SELECT COUNT(*) FROM {table}"))[0])
        rows[table] = (counts[0], counts[1])
    ledgers = []
    for db in (src, dst):
        async with db.reading() as read:
            ledgers.append([tuple(row) for row in await read.fetch(LEDGER_SQL)])
    verification = await target.verify(now_s)
    return MoveReport(rows, ledgers[0] == ledgers[1], verification.mismatches)
