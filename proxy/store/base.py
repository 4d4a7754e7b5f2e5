"""The Store contract: one method = one transaction = one business step; and its records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from proxy.alerts import Alert
from proxy.ledger import (
    Admitted,
    Blocked,
    ExtraFunds,
    MemberState,
    ReloadOrder,
    Split,
    Unaffordable,
    Windows,
)
from proxy.metering import Usage
from proxy.settings import Tier


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


@dataclass(slots=True)  # built for every request: not frozen (ledger.py says why)
class AdmissionRequest:
    """A request asking to be forwarded; admitted, it becomes a pending reservation."""

    request_id: str
    member_id: int
    org_id: str
    model: str
    stream: bool
    worst_case_nanos: int
    max_tokens: int
    output_nanos_per_token: int  # at the tier the input estimate falls in
    continue_requested: bool  # the `x-extra-usage: continue` header
    created_at_s: float
    expires_at_s: float


@dataclass(slots=True)  # built for every request: not frozen (ledger.py says why)
class Admission:
    """The outcome of admission and the member's state it was decided on (for headers)."""

    decision: Admitted | Blocked | Unaffordable
    windows: Windows
    member: MemberState
    funds: ExtraFunds


@dataclass(slots=True)  # built for every request: not frozen (ledger.py says why)
class Settled:
    """What a settlement did: the split of the charge, and a reload to buy (if one is due)."""

    org_id: str
    member_id: int
    split: Split
    windows_before: Windows
    reload: ReloadOrder | None
    request_id: str = ""
    member_email: str = ""
    funds_before: ExtraFunds | None = None  # month-to-date accounts before this charge
    balance_after_nanos: int | None = None  # prepaid orgs
    reload_threshold_nanos: int | None = None
    webhook: tuple[str, str] | None = None  # (url, name of the variable holding the secret)


@dataclass(frozen=True, slots=True)
class Purchase:
    transfer_id: int
    amount_nanos: int
    replayed: bool  # the same idempotency key was seen before: nothing new was bought


class StoreUnavailable(Exception):
    """The store cannot be reached (server down, connection lost, pool exhausted): the request
    fails with a 503 and nothing was charged twice; the store is tried again next time."""


class IdempotencyConflict(Exception):
    """An idempotency key replayed with a different amount."""

    def __init__(self, key: str, first_amount_nanos: int) -> None:
        super().__init__(f"idempotency_key {key!r} was used for a different amount")
        self.first_amount_nanos = first_amount_nanos


@dataclass(frozen=True, slots=True)
class Transfer:
    """One immutable ledger entry: + credits bought, - extra usage spent."""

    kind: str  # purchase | reload | adjustment | usage_extra | estimate_overrun
    amount_nanos: int
    month: str
    member_id: int | None
    request_id: str | None
    model: str | None
    created_at_s: float


@dataclass(frozen=True, slots=True)
class Statement:
    """A month of extra usage for one org, from its transfers."""

    org_id: str
    month: str
    plan: str
    usage_nanos: Mapping[tuple[str, str], int]  # (member email, model) -> extra usage spent
    credits_nanos: Mapping[str, int]  # purchase / reload / adjustment -> amount

    @property
    def usage_total_nanos(self) -> int:
        return sum(self.usage_nanos.values())

    @property
    def due_nanos(self) -> int:
        """What the month bills: postpaid extra usage, or the credits bought (prepaid)."""
        if self.plan == "enterprise":
            return self.usage_total_nanos
        return sum(self.credits_nanos.values())


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Posted requests of one member and model (in one slice of time), summed."""

    member: str  # email
    model: str
    slice_start_s: float  # a multiple of the slice length; the range's start when not sliced
    requests: int
    input_tokens: int
    output_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    cache_read_tokens: int
    cost_nanos: int
    included_nanos: int
    extra_nanos: int
    overrun_nanos: int


@dataclass(frozen=True, slots=True)
class MemberView:
    email: str
    role: str
    tier: str
    extra_usage_enabled: bool  # chosen for extra usage (when the org enables selected members)
    monthly_limit_nanos: int | None
    extra_usage_consent: str


@dataclass(frozen=True, slots=True)
class OrgView:
    """An org's settings as owners see and change them."""

    id: str
    plan: str
    timezone: str
    extra_usage: str  # off | all | selected
    monthly_limit_nanos: int | None  # None: unlimited
    balance_nanos: int
    reload_threshold_nanos: int | None
    reload_amount_nanos: int | None
    reservation: str
    webhook_url: str | None
    members: tuple[MemberView, ...] = ()
    tier_limits: Mapping[str, int | None] = field(default_factory=dict)


# The org settings the admin API may change (columns of the orgs table).
ORG_COLUMNS = frozenset(
    {
        "timezone",
        "extra_usage",
        "monthly_limit_nanos",
        "reload_threshold_nanos",
        "reload_amount_nanos",
        "reservation",
        "webhook_url",
        "webhook_secret_env",
    }
)


# The member settings the admin API may change (columns of the members table).
MEMBER_COLUMNS = frozenset(
    {"role", "tier", "extra_usage_enabled", "monthly_limit_nanos", "extra_usage_consent"}
)


@dataclass(frozen=True, slots=True)
class Verification:
    pending_reservations: int  # still pending past their expiry
    mismatches: tuple[str, ...]  # balances or month spend that differ from their transfers


@dataclass(frozen=True, slots=True)
class MemberStatus:
    windows: Windows
    member: MemberState
    funds: ExtraFunds


@dataclass(slots=True)  # built for every request: not frozen (ledger.py says why)
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
    billing: str = "included"
    included_nanos: int = 0
    extra_nanos: int = 0
    overrun_nanos: int = 0


# A monthly limit as a file or request states it: nanos, "unlimited", or None (not stated).
Limit = int | Literal["unlimited"] | None


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """A member as orgs.toml declares it."""

    email: str
    role: str
    tier: str
    key_sha256s: tuple[str, ...]
    key_prefixes: tuple[str, ...]
    extra_usage_consent: str = "ask"
    monthly_limit: Limit = None  # enterprise: overrides the tier's


@dataclass(frozen=True, slots=True)
class OrgSpec:
    """An organisation as orgs.toml declares it."""

    id: str
    plan: str
    timezone: str
    extra_usage: str  # "off" | "all" | "selected"
    extra_usage_members: tuple[str, ...]
    members: tuple[MemberSpec, ...]
    monthly_limit: Limit = None
    reload_threshold_nanos: int | None = None
    reload_amount_nanos: int | None = None
    credits_nanos: int | None = None  # the opening prepaid balance, bought once
    tier_limits: Mapping[str, Limit] = field(default_factory=dict)
    reservation: str | None = None  # "worst_case" | "expected"
    webhook_url: str | None = None
    webhook_secret_env: str | None = None


class Store(Protocol):
    async def find_seat(self, key_sha256: str) -> Seat | None:
        """The seat of an unrevoked key of a current member, or None."""
        ...

    async def admit(self, request: AdmissionRequest, tiers: Mapping[str, Tier]) -> Admission:
        """Decide who pays (ledger.admit) and, when admitted, record the pending reservation."""
        ...

    async def settle(self, settlement: Settlement, tiers: Mapping[str, Tier]) -> Settled | None:
        """Post (or void) a pending request, splitting its cost across included quota, extra
        usage and overrun; None when it was already settled (idempotent). A request whose
        reservation expired (a stream that ran longer than the TTL) is still posted, once."""
        ...

    async def purchase(
        self, org_id: str, amount_nanos: int, idempotency_key: str, now_s: float
    ) -> Purchase:
        """Buy prepaid credits once per idempotency key (IdempotencyConflict on another amount)."""
        ...

    async def finish_reload(self, order: ReloadOrder, paid: bool, now_s: float) -> None:
        """Record a reload the payment provider made (or failed to), clearing the pending mark."""
        ...

    async def verify(self, now_s: float) -> Verification: ...

    async def list_transfers(self, org_id: str, month: str | None = None) -> list[Transfer]: ...

    async def record_alert(self, alert: Alert) -> bool:
        """Store an alert once per key; False when it already fired in its period."""
        ...

    async def list_alerts(self, org_id: str) -> list[dict]: ...

    async def statement(self, org_id: str, month: str) -> Statement: ...

    async def expire_pending(self, now_s: float) -> int:
        """Settle as expired every reservation whose expiry has passed; return how many."""
        ...

    async def member_status(
        self, member_id: int, tiers: Mapping[str, Tier], now_s: float
    ) -> MemberStatus: ...

    async def continue_extra_usage(
        self, member_id: int, tiers: Mapping[str, Tier], now_s: float
    ) -> MemberStatus:
        """Record the member's choice to continue on extra usage (when it is enabled for them)."""
        ...

    async def secret(self, name: str) -> str: ...

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

    async def revoke_key(self, prefix_or_sha256: str, now_s: float) -> int:
        """Revoke the one live key with this prefix; how many matched (nothing revoked if >1)."""
        ...

    async def key_org(self, prefix_or_sha256: str) -> str | None: ...

    async def get_org(self, org_id: str) -> OrgView | None: ...

    async def update_org(
        self,
        org_id: str,
        changes: Mapping[str, object],
        extra_usage_members: tuple[str, ...] | None = None,
    ) -> bool: ...

    async def set_tier_limit(self, org_id: str, tier: str, limit_nanos: int | None) -> None: ...

    async def member_id(self, org_id: str, email: str) -> int | None: ...

    async def pending_count(self) -> int: ...

    async def list_keys(self, org_id: str, email: str) -> list[tuple[str, float, float | None]]:
        """(prefix, created_at_s, revoked_at_s) of a member's keys: never more than the prefix."""
        ...

    async def create_org(self, org_id: str, plan: str, timezone: str, now_s: float) -> bool: ...

    async def create_member(
        self, org_id: str, email: str, fields: Mapping[str, object], now_s: float
    ) -> int | None: ...

    async def update_member(
        self, org_id: str, email: str, fields: Mapping[str, object]
    ) -> bool: ...

    async def remove_member(self, org_id: str, email: str, now_s: float) -> bool: ...

    async def ping(self) -> None:
        """Raise when the store is unreachable."""
        ...

    async def close(self) -> None: ...

    async def usage_report(
        self, org_id: str, start_s: float, end_s: float, slice_s: int | None = None
    ) -> list[UsageRow]:
        """Posted requests of the org admitted in [start_s, end_s), summed per member and model
        and, when `slice_s` is given, per slice of that many seconds since the epoch."""
        ...
