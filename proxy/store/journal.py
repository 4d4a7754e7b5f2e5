"""The write-behind journal: an append-only file of the writes of admissions and settlements
that have not reached the tables yet. The SQLite store keeps one next to its database; a
PostgreSQL replica keeps one (`store.journal`) for the steps it decides from leases (leases.py),
whose records its batches apply (batches.py) as `SqliteDatabase` applies the SQLite store's,
described below.

A step that `Books` decides in memory (books.py) writes its statements here, one record per
step, before it returns: once `os.write` has returned, the step survives a crash of the process, as a
COMMIT in SQLite's WAL with `synchronous=NORMAL` does (neither survives a crash of the machine's
OS). `SqliteDatabase` applies the lines to the tables in batches, recording in the same
transaction the number of the last record applied (table `journal_applied`), and cuts the file
back to nothing once every record in it is applied. At start-up the records past that number are
applied first.

A record is its length (4 bytes, little-endian) and `marshal` data (format 4, which every Python
since 3.4 reads): `(number, [(sql, [parameters...]), ...])`. marshal is the fastest encoding of
these few strings and numbers (2 us a record, JSON 12 us) and, unlike pickle, runs no code when
read.

One process owns the file (an exclusive `flock`, held while the store is open). A second process
that opens the same database (`usage-proxy admin --config` while the proxy runs) does not get
it, and so neither replays nor writes it: it reads and writes the tables directly, and the owner
notices its commits (`PRAGMA data_version`).
"""

from __future__ import annotations

import fcntl
import marshal
import os
import struct
from typing import Any

import structlog

from proxy.store.base import StoreUnavailable

log = structlog.get_logger("proxy.store")

Statement = tuple[str, list[Any]]  # SQL with `?` placeholders, and its parameters
Record = tuple[int, list[Statement]]  # the number of a step's record, and its statements
MARSHAL_FORMAT = 4
LENGTH = struct.Struct("<I")


class Journal:
    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.size_bytes = os.fstat(fd).st_size

    @classmethod
    def open(cls, path: str) -> Journal | None:
        """The journal, locked for this process; None when another live process holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def append(self, seq: int, statements: list[Statement]) -> None:
        """Write one step's record; raise StoreUnavailable when it could not be written whole
        (and leave the file as it was): the step did not happen."""
        body = marshal.dumps((seq, statements), MARSHAL_FORMAT)
        line = LENGTH.pack(len(body)) + body
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"wrote {written} of {len(line)} bytes")
        except OSError as exc:
            os.ftruncate(self._fd, self.size_bytes)  # no half record for a later one to follow
            raise StoreUnavailable(f"the store's journal could not be written: {exc}") from None
        self.size_bytes += written

    def truncate(self) -> None:
        """Every line is applied: start the file over."""
        os.ftruncate(self._fd, 0)
        self.size_bytes = 0

    def close(self) -> None:
        os.close(self._fd)  # releases the lock


def read_records(path: str) -> list[Record]:
    """Every whole record, in order. A record cut short (the machine stopped mid-write) ends
    the journal: nothing after it was acknowledged."""
    with open(path, "rb") as file:
        content = file.read()
    records: list[Record] = []
    at = 0
    while at + LENGTH.size <= len(content):
        (length,) = LENGTH.unpack_from(content, at)
        body = content[at + LENGTH.size : at + LENGTH.size + length]
        try:
            if len(body) < length:
                raise ValueError("cut short")
            seq, statements = marshal.loads(body)
        except (ValueError, EOFError, TypeError) as exc:
            log.error("journal_record_unreadable", after_seq=_last(records), error=str(exc))
            break
        records.append((seq, statements))
        at += LENGTH.size + length
    return records


def _last(records: list[Record]) -> int | None:
    return records[-1][0] if records else None
