"""Pure rules: windows, who pays, admission, money limits and the split of a charge. No I/O.

The values a request builds here, in metering.py and in the store (about 25 a request) are
slotted dataclasses that nothing changes once built, not frozen ones: a frozen dataclass sets
each field through `object.__setattr__`, 4 to 5 times the cost of building a plain one (0.99 vs
0.20 us for 8 fields), and dropping `frozen` took 10.5% off the instructions of a request
(1.661 -> 1.486 M, `usage-proxy bench --instructions`). Build a changed copy with `replace`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from proxy.settings import Tier

SESSION, WEEKLY = "session", "weekly"
INCLUDED, EXTRA = "included", "extra"
DAY_S = 86_400


@dataclass(slots=True)
class Window:
    """One member's session or weekly window: opened by a request, closed by time passing."""

    kind: str
    started_at_s: float
    ends_at_s: float
    limit_nanos: int
    used_nanos: int = 0  # posted included usage, overrun included
    reserved_nanos: int = 0  # worst cases of requests in flight that bill it

    @property
    def remaining_nanos(self) -> int:
        return max(0, self.limit_nanos - self.used_nanos)

    def limited(self, limit_nanos: int) -> Window:
        """This window under another limit (`dataclasses.replace` costs 5 us; this, 1)."""
        return Window(
            self.kind,
            self.started_at_s,
            self.ends_at_s,
            limit_nanos,
            self.used_nanos,
            self.reserved_nanos,
        )

    def is_open(self, now_s: float) -> bool:
        return now_s < self.ends_at_s


@dataclass(slots=True)
class Windows:
    """The member's windows at one instant, and what changed to get there."""

    by_kind: Mapping[str, Window]
    opened: tuple[str, ...] = ()  # kinds that this instant opened (to be stored)
    clock_went_back: bool = False  # now is before a stored window began: kept as it was

    def get(self, kind: str) -> Window | None:
        return self.by_kind.get(kind)


def allowances(tier: Tier) -> dict[str, tuple[int, int]]:
    """The tier's included quota per window kind: (limit_nanos, window_s)."""
    result = {SESSION: (tier.session_included_nanos, tier.session_window_s)}
    if tier.weekly_included_nanos is not None:
        result[WEEKLY] = (tier.weekly_included_nanos, tier.weekly_window_s)
    return result


def with_limits(tier: Tier, stored: Mapping[str, Window]) -> Windows:
    """Stored windows with the limits of the member's tier today (limits are not stored)."""
    limits = allowances(tier)
    return Windows({k: w.limited(limits[k][0]) for k, w in stored.items() if k in limits})


def current_windows(tier: Tier, stored: Mapping[str, Window], now_s: float) -> Windows:
    """The windows open at `now_s`: a stored one until exactly its end, else a new one from now."""
    by_kind: dict[str, Window] = {}
    opened: list[str] = []
    went_back = False
    for kind, (limit_nanos, window_s) in allowances(tier).items():
        window = stored.get(kind)
        if window is not None and now_s < window.started_at_s:
            went_back = True  # a clock moved backwards: never reopen a window because of it
        if window is None or not (window.is_open(now_s) or now_s < window.started_at_s):
            window = Window(kind, now_s, now_s + window_s, limit_nanos)
            opened.append(kind)
        by_kind[kind] = window.limited(limit_nanos)  # the tier's limit of today
    return Windows(by_kind, tuple(opened), went_back)


@dataclass(slots=True)
class MemberState:
    """What the member may do beyond included quota (money limits come with billing)."""

    extra_usage_enabled: bool
    consent: str  # "ask" | "always"
    consent_until_s: float | None

    def has_continued(self, now_s: float) -> bool:
        return self.consent == "always" or (
            self.consent_until_s is not None and now_s < self.consent_until_s
        )


@dataclass(slots=True)
class Admitted:
    billing: str  # INCLUDED | EXTRA
    included_reserved_nanos: int  # added to the windows' reservations
    consent_until_s: float | None = None  # a new consent to store (continue header)


@dataclass(slots=True)
class Blocked:
    limit: str  # "session" | "weekly" | "extra_usage_disabled"
    window: Window  # the window that ran out
    extra_usage: str  # "available" | "disabled"


def blocking_window(windows: Windows, rule: str, worst_case_nanos: int) -> Window | None:
    """The window that keeps a request off included quota, or None when included admits it.

    `any_remaining`: admitted while anything is left (the crossing request may finish).
    `worst_case`: admitted only when the worst case fits beside what is in flight.
    When several block, the one that resets last is named: waiting for the other would not help.
    """
    blocking = [
        w
        for w in windows.by_kind.values()
        if (
            w.used_nanos >= w.limit_nanos
            if rule == "any_remaining"
            else w.used_nanos + w.reserved_nanos + worst_case_nanos > w.limit_nanos
        )
    ]
    return max(blocking, key=lambda w: w.ends_at_s) if blocking else None


def admit(
    windows: Windows,
    tier: Tier,
    worst_case_nanos: int,
    member: MemberState,
    *,
    continue_requested: bool,
    now_s: float,
) -> Admitted | Blocked:
    """Who pays for a request: included quota first, extra usage once the member continued."""
    blocker = blocking_window(windows, tier.included_admission, worst_case_nanos)
    if blocker is None:
        return Admitted(INCLUDED, worst_case_nanos)
    if not member.extra_usage_enabled:
        limit = "extra_usage_disabled" if continue_requested else blocker.kind
        return Blocked(limit, blocker, "disabled")
    if member.has_continued(now_s):
        return Admitted(EXTRA, 0)
    if continue_requested:
        return Admitted(EXTRA, 0, consent_until_s=consent_until(windows, now_s))
    return Blocked(blocker.kind, blocker, "available")


def consent_until(windows: Windows, now_s: float) -> float:
    """A choice to continue lasts until the window that blocked resets (the latest exhausted one;
    the session window's end when none is exhausted yet)."""
    exhausted = [w.ends_at_s for w in windows.by_kind.values() if w.used_nanos >= w.limit_nanos]
    if exhausted:
        return max(exhausted)
    return windows.by_kind[SESSION].ends_at_s


@dataclass(slots=True)
class Split:
    """How one settled charge divides: included quota, extra usage, and included overrun."""

    included_nanos: int
    extra_nanos: int
    overrun_nanos: int


def split_charge(cost_nanos: int, windows: Windows, billing: str) -> Split:
    """Included quota first; the rest to extra usage if the member continued, else an overrun."""
    room_nanos = min((w.remaining_nanos for w in windows.by_kind.values()), default=0)
    included = min(cost_nanos, room_nanos)
    rest = cost_nanos - included
    if billing == EXTRA:
        return Split(included, rest, 0)
    return Split(included, 0, rest)


# ---- Extra usage: money limits and the prepaid balance --------------------------------------

ORG_MONTHLY, TIER_MONTHLY, MEMBER_MONTHLY, BALANCE = (
    "org_monthly",
    "tier_monthly",
    "member_monthly",
    "balance",
)
PREPAID_PLANS = frozenset({"team", "max"})  # enterprise is postpaid


@dataclass(slots=True)
class Account:
    """A limit or balance that extra usage draws on, as it stands at one instant."""

    name: str  # ORG_MONTHLY | TIER_MONTHLY | MEMBER_MONTHLY | BALANCE
    limit_nanos: int | None  # None: unlimited (for BALANCE: the balance itself)
    used_nanos: int = 0  # posted this month (0 for BALANCE: spending lowers the balance)
    reserved_nanos: int = 0  # worst cases of requests in flight

    @property
    def headroom_nanos(self) -> int | None:
        if self.limit_nanos is None:
            return None
        return max(0, self.limit_nanos - self.used_nanos - self.reserved_nanos)


@dataclass(slots=True)
class Unaffordable:
    """Extra usage would pay, but a limit or the balance cannot fit the request's worst case."""

    account: Account
    worst_case_nanos: int


def short_account(accounts: list[Account], amount_nanos: int) -> Account | None:
    """The account that cannot fit `amount_nanos` (the tightest when several), or None."""
    short = [
        a for a in accounts if a.headroom_nanos is not None and a.headroom_nanos < amount_nanos
    ]
    return min(short, key=lambda a: a.headroom_nanos or 0) if short else None


def headroom_nanos(accounts: list[Account]) -> int | None:
    """What extra usage can still spend: the tightest account; None when nothing limits it."""
    rooms = [a.headroom_nanos for a in accounts if a.headroom_nanos is not None]
    return min(rooms) if rooms else None


def extra_to_reserve(
    decision: Admitted, windows: Windows, worst_case_nanos: int, member: MemberState, now_s: float
) -> int:
    """The part of a worst case that extra usage may have to pay (settlement charges included
    quota first): all of it on extra billing; what included quota cannot cover when the member
    has continued; nothing otherwise (the excess is then an included overrun)."""
    if decision.billing == EXTRA:
        return worst_case_nanos
    if decision.consent_until_s is not None or member.has_continued(now_s):
        room_nanos = min((w.remaining_nanos for w in windows.by_kind.values()), default=0)
        return max(0, worst_case_nanos - room_nanos)
    return 0


RECENT_REQUESTS = 20  # how many of a member's requests of a model the expected estimate reads


def expected_reservation_nanos(
    worst_case_nanos: int, max_tokens: int, output_nanos_per_token: int, recent_outputs: list[int]
) -> int:
    """`reservation = "expected"`: the worst case with max_tokens of output replaced by the
    largest output among the member's recent requests of the model (capped at max_tokens). With
    no history it is the worst case. What a request spends beyond it is an explicit overrun."""
    if not recent_outputs:
        return worst_case_nanos
    expected_output = min(max_tokens, max(recent_outputs))
    return worst_case_nanos - (max_tokens - expected_output) * output_nanos_per_token


def reload_due(balance_before_nanos: int, balance_after_nanos: int, threshold_nanos: int) -> bool:
    """A settlement that takes the balance from above the threshold to at or below it."""
    return balance_before_nanos > threshold_nanos >= balance_after_nanos


def month_of(at_s: float, timezone: str) -> str:
    """The calendar month (YYYY-MM) of an instant in the org's time zone."""
    local = datetime.fromtimestamp(at_s, ZoneInfo(timezone))
    return f"{local.year:04d}-{local.month:02d}"


def next_month(month: str) -> str:
    """The calendar month (YYYY-MM) after `month`."""
    year, number = (int(part) for part in month.split("-"))
    return f"{year + 1:04d}-01" if number == 12 else f"{year:04d}-{number + 1:02d}"


def month_start_s(month: str, timezone: str) -> float:
    """When a month begins in the org's time zone."""
    year, number = (int(part) for part in month.split("-"))
    return datetime(year, number, 1, tzinfo=ZoneInfo(timezone)).timestamp()


def month_end_s(month: str, timezone: str) -> float:
    """When a month ends (the next one begins) in the org's time zone."""
    return month_start_s(next_month(month), timezone)


class Months:
    """`month_of` for a stream of instants close together (every admission and settlement asks
    it): each zone's last month is kept with the span it surely covers, from a day after the
    month's start to a day before its end (no zone's clock jumps by a day at a month's start),
    so most answers cost a comparison instead of a time zone conversion (1.4% of a request's
    instructions, `bench --instructions`)."""

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: dict[str, tuple[float, float, str]] = {}  # zone -> (from_s, to_s, month)

    def of(self, at_s: float, timezone: str) -> str:
        known = self._known.get(timezone)
        if known is not None and known[0] <= at_s < known[1]:
            return known[2]
        month = month_of(at_s, timezone)
        self._known[timezone] = (
            month_start_s(month, timezone) + DAY_S,
            month_end_s(month, timezone) - DAY_S,
            month,
        )
        return month


@dataclass(slots=True)
class ExtraFunds:
    """What extra usage can draw on for one member this month."""

    month: str
    prepaid: bool
    accounts: tuple[Account, ...]
    timezone: str = "UTC"
    member_spent_nanos: int = 0  # the member's extra usage posted this month
    reservation: str = "worst_case"  # the org's rule: "worst_case" | "expected"

    def account(self, *names: str) -> Account | None:
        return next((a for a in self.accounts if a.name in names), None)


@dataclass(frozen=True, slots=True)
class ReloadOrder:
    """An auto-reload to buy: at most one per crossing of the threshold."""

    org_id: str
    amount_nanos: int
    idempotency_key: str
