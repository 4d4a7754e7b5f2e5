"""The Store contract: one method = one transaction = one business step; and its records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.metering import Usage


@dataclass(frozen=True, slots=True)
class Seat:
    """Who a key belongs to: the member, their org and their seat."""

    member_id: int
    org_id: str
    email: str
    role: str
    tier: str
    plan: str
    timezone: str


@dataclass(frozen=True, slots=True)
class Reservation:
    """A request admitted and about to be forwarded: pending until settled."""

    request_id: str
    member_id: int
    org_id: str
    model: str
    stream: bool
    reserved_nanos: int
    created_at_s: float
    expires_at_s: float


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a request turned out to cost; `usage` None means nothing billable (void)."""

    request_id: str
    usage: Usage | None
    cost_nanos: int
    upstream_status: int | None
    outcome: str
    settled_at_s: float
    upstream_ms: float | None
    duration_ms: float


@dataclass(frozen=True, slots=True)
class RequestRecord:
    request_id: str
    member_id: int
    model: str
    stream: bool
    status: str
    usage: Usage
    reserved_nanos: int
    cost_nanos: int
    upstream_status: int | None
    outcome: str | None


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """A member as orgs.toml declares it."""

    email: str
    role: str
    tier: str
    key_sha256s: tuple[str, ...]
    key_prefixes: tuple[str, ...]
    extra_usage_consent: str = "ask"


@dataclass(frozen=True, slots=True)
class OrgSpec:
    """An organisation as orgs.toml declares it."""

    id: str
    plan: str
    timezone: str
    extra_usage: str  # "off" | "all" | "selected"
    extra_usage_members: tuple[str, ...]
    members: tuple[MemberSpec, ...]


class Store(Protocol):
    async def find_seat(self, key_sha256: str) -> Seat | None:
        """The seat of an unrevoked key of a current member, or None."""
        ...

    async def reserve(self, reservation: Reservation) -> None:
        """Record an admitted request as pending (before it is forwarded)."""
        ...

    async def settle(self, settlement: Settlement) -> bool:
        """Post (or void) a pending request; False when it was already settled (idempotent)."""
        ...

    async def expire_pending(self, now_s: float) -> int:
        """Settle as expired every reservation whose expiry has passed; return how many."""
        ...

    async def get_request(self, request_id: str) -> RequestRecord | None: ...

    async def recent_requests(self, limit: int) -> list[RequestRecord]:
        """The newest request records first."""
        ...

    async def apply_orgs(self, orgs: list[OrgSpec], now_s: float) -> None:
        """Apply a declarative org file: only values that changed in the file are written."""
        ...

    async def issue_key(
        self, member_id: int, key_sha256: str, prefix: str, now_s: float
    ) -> None: ...

    async def revoke_key(self, prefix_or_sha256: str, now_s: float) -> int: ...

    async def ping(self) -> None:
        """Raise when the store is unreachable."""
        ...

    async def close(self) -> None: ...
