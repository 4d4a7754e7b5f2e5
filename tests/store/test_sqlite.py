"""The SQLite backend's group commit: the steps of one event-loop turn share one COMMIT."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from proxy.settings import StoreSettings
from proxy.store import open_store
from proxy.store.base import StoreUnavailable
from proxy.store.sql import _NEWEST_WINDOWS, MOVE_WINDOWS_SQL, windows_at
from proxy.store.sqlite import CHECKPOINT_COMMITS, CHECKPOINT_NICE
from proxy.tasks import Tasks


async def open_db(tmp_path: Path):
    store = await open_store(StoreSettings(url=f"sqlite:///{tmp_path / 'group.db'}"))
    db = store.database
    async with db.transaction() as tx:
        await tx.execute("CREATE TABLE notes (n INTEGER PRIMARY KEY)")
    return store, db


def committed_notes(tmp_path: Path) -> list[int]:
    """What another connection sees: only committed rows."""
    with sqlite3.connect(tmp_path / "group.db") as other:
        return [row[0] for row in other.execute("SELECT n FROM notes ORDER BY n")]


async def test_steps_of_one_turn_share_a_commit_and_return_once_it_is_done(tmp_path):
    store, db = await open_db(tmp_path)
    commits = []

    async def step(n: int) -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO notes (n) VALUES (?)", (n,))
        commits.append(committed_notes(tmp_path))  # durable when the step returns

    await asyncio.gather(*(step(n) for n in range(10)))
    assert commits == [list(range(10))] * 10  # one commit held all ten
    await store.close()


async def test_a_failed_step_rolls_back_alone(tmp_path):
    store, db = await open_db(tmp_path)

    async def step(n: int) -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO notes (n) VALUES (?)", (n,))
            if n == 1:
                raise ValueError("this step fails")

    results = await asyncio.gather(*(step(n) for n in range(3)), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "ValueError", "NoneType"]
    assert committed_notes(tmp_path) == [0, 2]
    await store.close()


async def test_a_caller_cancelled_before_the_commit_still_learns_its_step_is_in(tmp_path):
    store, db = await open_db(tmp_path)
    learned = []

    async def admit() -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO notes (n) VALUES (1)")
        learned.append("in")  # the step returned: the caller can settle what it reserved
        await asyncio.sleep(0)  # the cancellation lands here

    task = Tasks().spawn(admit(), name="admit")
    await asyncio.sleep(0)  # the step ran; its commit is due at the end of this turn
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert learned == ["in"]
    assert committed_notes(tmp_path) == [1]
    await store.close()


async def test_close_commits_an_open_batch(tmp_path):
    store, db = await open_db(tmp_path)

    async def step() -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO notes (n) VALUES (7)")

    task = Tasks().spawn(step(), name="step")
    await asyncio.sleep(0)  # the step ran; its commit is due at the end of this turn
    await store.close()  # before that: close commits it
    await task
    assert committed_notes(tmp_path) == [7]


async def test_a_failed_commit_fails_every_step_of_its_turn_and_keeps_nothing(tmp_path):
    store, db = await open_db(tmp_path)
    async with db.transaction() as tx:  # a constraint SQLite checks only at COMMIT
        await tx.execute(
            "CREATE TABLE refs (n INTEGER REFERENCES notes (n) DEFERRABLE INITIALLY DEFERRED)"
        )

    async def step(sql: str) -> None:
        async with db.transaction() as tx:
            await tx.execute(sql)

    results = await asyncio.gather(
        step("INSERT INTO notes (n) VALUES (1)"),
        step("INSERT INTO refs (n) VALUES (99)"),  # no note 99: the COMMIT fails
        return_exceptions=True,
    )
    assert [type(r).__name__ for r in results] == ["StoreUnavailable"] * 2
    assert committed_notes(tmp_path) == []
    await step("INSERT INTO notes (n) VALUES (2)")  # the store goes on
    assert committed_notes(tmp_path) == [2]
    await store.close()


async def test_the_wal_starts_over_under_steady_writes(tmp_path):
    """A checkpoint that runs beside the writes never copies every frame while they go on, and
    only one that does lets the WAL start over: without the finishing checkpoint (writes held
    for it), 6,000 back-to-back commits left a WAL of 37 MB, growing without end."""
    store, db = await open_db(tmp_path)
    note = "x" * 1000
    async with db.transaction() as tx:
        await tx.execute("ALTER TABLE notes ADD COLUMN text TEXT")
    for n in range(6000):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO notes (n, text) VALUES (?, ?)", (n, note))
    wal_bytes = (tmp_path / "group.db-wal").stat().st_size
    assert len(committed_notes(tmp_path)) == 6000
    await store.close()
    assert wal_bytes < 8 * 1024 * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
async def test_checkpoints_run_in_a_thread_of_lower_priority_than_the_loop(tmp_path):
    store, db = await open_db(tmp_path)
    for n in range(CHECKPOINT_COMMITS + 1):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO notes (n) VALUES (?)", (n,))
    checkpointers = [t for t in threading.enumerate() if t.name.startswith("sqlite-checkpoint")]
    try:
        assert len(checkpointers) == 1
        loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        thread_nice = os.getpriority(os.PRIO_PROCESS, checkpointers[0].native_id)
        assert thread_nice == min(19, loop_nice + CHECKPOINT_NICE)
        assert loop_nice == os.getpriority(os.PRIO_PROCESS, 0)  # the process's own is untouched
    finally:
        await store.close()
    assert not checkpointers[0].is_alive()  # closing the store ends its thread


async def test_a_step_waits_for_another_process_lock_without_stopping_the_loop(tmp_path):
    """`admin --config` in another process holds the write lock: the step waits, and the event
    loop (every other request and stream) runs on meanwhile; SQLite's own busy wait would have
    stopped it."""
    store, db = await open_db(tmp_path)
    other = sqlite3.connect(tmp_path / "group.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO notes (n) VALUES (1)")

    async def step() -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO notes (n) VALUES (2)")

    waiting = asyncio.ensure_future(step())
    ticks = 0
    for _ in range(10):  # the loop goes round while the step waits
        await asyncio.sleep(0.005)
        ticks += 1
    assert ticks == 10 and not waiting.done()
    other.execute("COMMIT")
    other.close()
    await waiting
    assert committed_notes(tmp_path) == [1, 2]
    await store.close()


async def test_a_lock_held_past_the_busy_timeout_is_the_store_unavailable(tmp_path):
    store, db = await open_db(tmp_path)
    other = sqlite3.connect(tmp_path / "group.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailable, match="locked by another process"):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO notes (n) VALUES (1)")
    other.execute("ROLLBACK")
    other.close()
    async with db.transaction() as tx:  # and it serves again once the lock is gone
        await tx.execute("INSERT INTO notes (n) VALUES (2)")
    assert committed_notes(tmp_path) == [2]
    await store.close()


def test_a_members_windows_are_found_by_key_however_many_it_has_had(tmp_path: Path) -> None:
    """Each admission and settlement moves the two windows it began in, and a first step reads
    the newest of each kind: by their key, not by reading all of the member's windows (about
    five a day; SQLite's planner filtered them all for the `IN` form, with no statistics)."""
    conn = sqlite3.connect(tmp_path / "plans.db")
    conn.execute(
        "CREATE TABLE windows (member_id INTEGER NOT NULL, kind TEXT NOT NULL, "
        "started_at_s REAL NOT NULL, ends_at_s REAL NOT NULL, used_nanos INTEGER DEFAULT 0, "
        "reserved_nanos INTEGER DEFAULT 0, PRIMARY KEY (member_id, kind, started_at_s))"
    )
    conn.executemany(
        "INSERT INTO windows (member_id, kind, started_at_s, ends_at_s) VALUES (?, ?, ?, ?)",
        [(1, kind, n, n + 1) for n in range(2500) for kind in ("session", "weekly")],
    )

    def plan(sql: str, params: tuple) -> str:
        return " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))

    moved = plan(MOVE_WINDOWS_SQL, (1, 1, *windows_at(1, (2400.0, 2000.0))))
    assert moved.count("(member_id=? AND kind=? AND started_at_s=?)") == 2, moved
    newest = plan(_NEWEST_WINDOWS, (1, 1))
    assert newest.count("(member_id=? AND kind=?)") == 2, newest  # the key's end, in order:
    assert "SCAN windows" not in newest and "TEMP B-TREE" not in newest, newest  # not sorted
    assert conn.execute(_NEWEST_WINDOWS, (1, 1)).fetchall() == [
        ("window", "session", 2499.0, 2500.0, 0, 0),
        ("window", "weekly", 2499.0, 2500.0, 0, 0),
    ]
