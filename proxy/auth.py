"""Member keys: how they arrive, how they are stored (SHA-256 only) and resolved to a seat."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

from proxy.clock import Clock
from proxy.store.base import Seat, Store

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
    """Seats by key hash for `ttl_s` seconds, so the hot path needs no store read for auth.

    A revoked key stops working within `ttl_s` (2 s by default) on every replica.
    Misses (unknown keys) are not cached, so a newly issued key works at once.
    """

    def __init__(self, store: Store, clock: Clock, ttl_s: float) -> None:
        self._store = store
        self._clock = clock
        self._ttl_s = ttl_s
        self._seats: dict[str, tuple[Seat, float]] = {}

    def forget(self) -> None:
        """After a revocation through this process: it takes effect at once here."""
        self._seats.clear()

    async def seat(self, key: str) -> Seat | None:
        return await self.seat_by_hash(hash_key(key))

    async def seat_by_hash(self, digest: str) -> Seat | None:
        """The seat of the key whose SHA-256 is `digest` (a web session keeps only that)."""
        cached = self._seats.get(digest)
        now_s = self._clock.now_s()
        if cached is not None and now_s < cached[1]:
            return cached[0]
        seat = await self._store.find_seat(digest)
        if seat is None:
            self._seats.pop(digest, None)
        elif self._ttl_s > 0:
            if len(self._seats) > 100_000:
                self._seats.clear()
            self._seats[digest] = (seat, now_s + self._ttl_s)
        return seat
