"""Member keys: how they arrive, how they are stored (SHA-256 only) and resolved to a seat."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

from proxy.clock import Clock
from proxy.store.base import Seat, Store, StoreUnavailable
from proxy.tasks import Tasks

ISSUED_KEY_PREFIX = "sk-up-"
VISIBLE_PREFIX_CHARS = 12


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_prefix(key: str) -> str:
    """The short, non-secret part of a key that lists and revocations show."""
    return key[:VISIBLE_PREFIX_CHARS]


def new_key() -> str:
    """A fresh member key: 256 bits of randomness behind a recognisable prefix."""
    return ISSUED_KEY_PREFIX + secrets.token_urlsafe(32)


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The member key as Claude Code and the SDKs send it: `x-api-key` or a Bearer token."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


class KeyCache:
    """Seats by key hash, so the hot path needs no store read for auth.

    A seat serves for `ttl_s` seconds (2 by default) from the moment its read began: a key
    revoked on another replica stops working within that time. Once a seat is half that old,
    the request that finds it still gets it at once, and the key is read again in the
    background, one read at a time per key: under steady traffic no request waits for a
    store read (under the bench's load such a wait took 1.4 ms on average on SQLite and 5 ms
    on PostgreSQL, README "Performance"), and a revocation counts from the first read that
    sees it.
    Misses (unknown keys) are not cached, so a newly issued key works at once. `forget` (a
    change made through this process) drops every seat, and a read that was under way then
    caches nothing: what it found may be from before the change.
    """

    def __init__(self, store: Store, clock: Clock, ttl_s: float, tasks: Tasks) -> None:
        self._store = store
        self._clock = clock
        self._ttl_s = ttl_s
        self._tasks = tasks
        self._seats: dict[str, tuple[Seat, float]] = {}  # digest -> (seat, its read began)
        self._reading: set[str] = set()  # digests read again in the background now
        self._forgotten = 0  # how many times `forget` ran: a read that sees it change keeps out

    def forget(self) -> None:
        """After a change through this process (a revocation, a new role or tier): it takes
        effect at once here."""
        self._seats.clear()
        self._forgotten += 1

    async def seat(self, key: str) -> Seat | None:
        return await self.seat_by_hash(hash_key(key))

    async def seat_by_hash(self, digest: str) -> Seat | None:
        """The seat of the key whose SHA-256 is `digest` (a web session keeps only that)."""
        cached = self._seats.get(digest)
        if cached is not None:
            seat, read_s = cached
            age_s = self._clock.now_s() - read_s
            if age_s < self._ttl_s:
                if age_s >= self._ttl_s / 2 and digest not in self._reading:
                    self._reading.add(digest)
                    self._tasks.spawn(self._read_again(digest), name="key read again")
                return seat
        return await self._read(digest)

    async def _read(self, digest: str) -> Seat | None:
        forgotten, read_s = self._forgotten, self._clock.now_s()
        seat = await self._store.find_seat(digest)
        if seat is None:
            self._seats.pop(digest, None)
        elif self._ttl_s > 0 and forgotten == self._forgotten:
            if len(self._seats) > 100_000:
                self._seats.clear()
            self._seats[digest] = (seat, read_s)
        return seat

    async def _read_again(self, digest: str) -> None:
        try:
            await self._read(digest)
        except StoreUnavailable:
            pass  # the seat serves out its ttl_s; then a request's own read meets the error
        finally:
            self._reading.discard(digest)
