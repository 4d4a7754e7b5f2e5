"""The SQLite store's books in memory and its write-behind journal (books.py, journal.py):
steps decided in memory reach the tables, survive a crash, and never decide on stale books."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
import tomllib
from pathlib import Path

from proxy.ledger import Unaffordable
from proxy.orgfile import parse_orgs
from proxy.settings import StoreSettings
from proxy.store import open_store
from proxy.store.base import Store
from proxy.store.books import VERSION_EVERY_S
from proxy.store.journal import Journal, read_records
from proxy.store.sqlite import JOURNAL_SUFFIX
from tests.conftest import DEFAULT_ORGS, ROOT
from tests.store.test_contract import NOW_S, PLANS, TIERS, alice, asking, settling


async def opened(path: Path) -> Store:
    store = await open_store(StoreSettings(url=f"sqlite:///{path}"))
    await store.apply_orgs(parse_orgs(tomllib.loads(DEFAULT_ORGS), "orgs.toml", PLANS), NOW_S)
    return store


def in_tables(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """What another connection sees in the file."""
    with sqlite3.connect(path) as other:
        return other.execute(sql, params).fetchall()


async def in_another_process(path: Path, steps: str) -> str:
    """Run `steps` (indented Python) in a process of its own, with the store at `path` opened as
    `store` and alice's id as `member_id`; what it printed."""
    script = f"""
import asyncio, os, resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from proxy.settings import StoreSettings
from proxy.store import open_store
from proxy.store.base import StoreUnavailable
from tests.store.test_contract import TIERS, alice, asking, settling

async def main():
    store = await open_store(StoreSettings(url="sqlite:///{path}"))
    member_id = await alice(store)
{textwrap.indent(textwrap.dedent(steps), "    ")}
asyncio.run(main())
"""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_a_step_the_books_can_decide_is_a_journal_record_until_applied(tmp_path):
    path = tmp_path / "b.db"
    store = await opened(path)
    member_id = await alice(store)
    await store.admit(asking(member_id, "first", 1_000), TIERS)  # reads the books: a transaction
    assert in_tables(path, "SELECT status FROM requests WHERE id = 'first'") == [("pending",)]

    await store.admit(asking(member_id, "second", 1_000), TIERS)  # decided in memory
    assert store.database.records_waiting
    assert in_tables(path, "SELECT status FROM requests WHERE id = 'second'") == []
    assert len(read_records(f"{path}{JOURNAL_SUFFIX}")) == 1  # on disk before admit returned

    await store.database.flush()
    assert in_tables(path, "SELECT status FROM requests WHERE id = 'second'") == [("pending",)]
    assert in_tables(path, "SELECT seq FROM journal_applied") == [(1,)]
    assert (await store.get_request("second")).status == "pending"  # reads see every record
    await store.close()
    assert read_records(f"{path}{JOURNAL_SUFFIX}") == []  # all applied: it starts over


async def test_records_left_by_a_crash_are_applied_once_at_the_next_start(tmp_path):
    path = tmp_path / "b.db"
    await (await opened(path)).close()
    await in_another_process(
        path,
        """
        for n in range(3):
            await store.admit(asking(member_id, f"r{n}", 1_000), TIERS)
            await store.settle(settling(f"r{n}", 700), TIERS)
        await store.admit(asking(member_id, "in-flight", 1_000), TIERS)
        assert store.database.records_waiting
        os._exit(0)  # as kill -9: no close, nothing applied
        """,
    )
    assert len(read_records(f"{path}{JOURNAL_SUFFIX}")) >= 4
    [(posted,)] = in_tables(path, "SELECT COUNT(*) FROM requests WHERE status = 'posted'")
    assert posted < 3  # some of it was only in the journal

    store = await open_store(StoreSettings(url=f"sqlite:///{path}"))  # replays the journal
    statuses = dict(in_tables(path, "SELECT id, status FROM requests"))
    assert statuses == {"r0": "posted", "r1": "posted", "r2": "posted", "in-flight": "pending"}
    assert in_tables(path, "SELECT SUM(used_nanos), SUM(reserved_nanos) FROM windows") == [
        (2_100, 1_000)
    ]
    assert (await store.verify(NOW_S)).mismatches == ()
    await store.close()
    store = await open_store(StoreSettings(url=f"sqlite:///{path}"))  # nothing applies twice
    assert in_tables(path, "SELECT SUM(used_nanos), SUM(reserved_nanos) FROM windows") == [
        (2_100, 1_000)
    ]
    await store.close()


async def test_another_process_on_the_file_gets_no_journal_and_its_changes_count(tmp_path):
    path = tmp_path / "b.db"
    proxy = await opened(path)
    member_id = await alice(proxy)
    await proxy.admit(asking(member_id, "a", 10_000_000), TIERS)
    await proxy.settle(settling("a", 10_000_000), TIERS)  # in memory: alice's session is spent

    admin = await open_store(StoreSettings(url=f"sqlite:///{path}"))  # `admin --config`
    assert admin.database.journal is None  # the proxy owns it: no replay, no records
    await admin.update_org("acme", {"monthly_limit_nanos": 0})  # commits on its own connection
    await admin.close()
    await asyncio.sleep(2 * VERSION_EVERY_S)  # it counts within that long (admin took 0.7 ms+)

    refused = await proxy.admit(asking(member_id, "b", 1_000, continue_requested=True), TIERS)
    assert isinstance(refused.decision, Unaffordable)  # extra usage, on the limit set elsewhere
    assert refused.decision.account.limit_nanos == 0
    await proxy.close()


async def test_a_sweep_that_expires_nothing_leaves_the_books_in_memory(tmp_path):
    """The sweeper looks every 30 s; a look that wrote nothing must not send the next request
    of every member through a transaction to read its books again."""
    store = await opened(tmp_path / "b.db")
    member_id = await alice(store)
    await store.admit(asking(member_id, "first", 1_000), TIERS)  # reads the books: a transaction
    assert await store.expire_pending(NOW_S) == 0
    await store.admit(asking(member_id, "second", 1_000), TIERS)
    assert store.database.records_waiting  # decided in memory: a journal record
    await store.close()


async def test_a_change_through_the_store_itself_reaches_the_next_decision(tmp_path):
    path = tmp_path / "b.db"
    store = await opened(path)
    member_id = await alice(store)
    await store.admit(asking(member_id, "a", 10_000_000), TIERS)
    await store.settle(settling("a", 10_000_000), TIERS)  # the session is spent
    admitted = await store.admit(asking(member_id, "b", 1_000, continue_requested=True), TIERS)
    assert admitted.decision.billing == "extra"
    await store.settle(settling("b", 1_000), TIERS)
    await store.update_org("acme", {"monthly_limit_nanos": 0})
    refused = await store.admit(asking(member_id, "c", 1_000), TIERS)
    assert isinstance(refused.decision, Unaffordable)
    await store.close()


def test_a_record_cut_short_ends_the_journal(tmp_path):
    path = str(tmp_path / "j")
    journal = Journal.open(path)
    assert journal is not None
    journal.append(1, [("UPDATE t SET x = x + ?", [1])])
    journal.append(2, [("UPDATE t SET x = x + ?", [2.5]), ("DELETE FROM t", [])])
    assert Journal.open(path) is None  # held by this one
    journal.close()
    whole = Path(path).read_bytes()
    Path(path).write_bytes(whole + whole[:7])  # a third record, cut off by the machine stopping
    assert read_records(path) == [
        (1, [("UPDATE t SET x = x + ?", [1])]),
        (2, [("UPDATE t SET x = x + ?", [2.5]), ("DELETE FROM t", [])]),
    ]


async def test_a_record_that_cannot_be_written_refuses_its_step_and_loses_nothing(tmp_path):
    """The journal's file may not grow (a full disk, here a file size limit): the admission
    fails as the store being unavailable, the file is left as it was, the next one goes on."""
    path = tmp_path / "b.db"
    await (await opened(path)).close()
    printed = await in_another_process(
        path,
        f"""
        await store.admit(asking(member_id, "first", 1_000), TIERS)
        await store.admit(asking(member_id, "second", 1_000), TIERS)
        journal = "{path}{JOURNAL_SUFFIX}"
        size_bytes = os.path.getsize(journal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes + 10, hard))  # room for a part
        try:
            await store.admit(asking(member_id, "third", 1_000), TIERS)
            raise SystemExit("the third admission went in")
        except StoreUnavailable as exc:
            print("refused:", exc)
        assert os.path.getsize(journal) == size_bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        await store.admit(asking(member_id, "fourth", 1_000), TIERS)
        for request_id in ("first", "second", "fourth"):
            assert await store.settle(settling(request_id, 500), TIERS) is not None
        await store.close()
        """,
    )
    assert "journal could not be written" in printed
    assert in_tables(path, "SELECT id, status FROM requests ORDER BY id") == [
        ("first", "posted"),
        ("fourth", "posted"),
        ("second", "posted"),
    ]
    assert in_tables(path, "SELECT SUM(used_nanos), SUM(reserved_nanos) FROM windows") == [
        (1_500, 0)
    ]
