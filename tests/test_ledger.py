"""Pure rules of included quota: windows, admission, split. Table-driven, no I/O."""

from __future__ import annotations

import pytest

from proxy.ledger import (
    BALANCE,
    EXTRA,
    INCLUDED,
    ORG_MONTHLY,
    SESSION,
    TIER_MONTHLY,
    WEEKLY,
    Account,
    Admitted,
    Blocked,
    MemberState,
    Months,
    Split,
    Window,
    admit,
    current_windows,
    expected_reservation_nanos,
    extra_to_reserve,
    month_end_s,
    month_of,
    reload_due,
    short_account,
    split_charge,
    with_limits,
)
from proxy.settings import Tier

HOUR_S = 3600
START_S = 1_000_000.0
TIER = Tier("standard", session_included_nanos=5_000_000_000, weekly_included_nanos=40_000_000_000)
SESSION_ONLY = Tier("standard", session_included_nanos=5_000_000_000)
WORST_CASE = Tier("standard", session_included_nanos=5_000_000_000, included_admission="worst_case")

ASK = MemberState(extra_usage_enabled=True, consent="ask", consent_until_s=None)
OFF = MemberState(extra_usage_enabled=False, consent="ask", consent_until_s=None)
ALWAYS = MemberState(extra_usage_enabled=True, consent="always", consent_until_s=None)


def session(used_nanos: int = 0, reserved_nanos: int = 0, started_s: float = START_S) -> Window:
    return Window(
        SESSION, started_s, started_s + 5 * HOUR_S, 5_000_000_000, used_nanos, reserved_nanos
    )


@pytest.mark.parametrize(
    ("offset_s", "reopened"),
    [(5 * HOUR_S - 1, False), (5 * HOUR_S, True), (5 * HOUR_S + 1, True), (0, False)],
    ids=["reset-1s", "reset", "reset+1s", "start"],
)
def test_session_window_closes_exactly_at_its_reset(offset_s: int, reopened: bool) -> None:
    stored = {SESSION: session(used_nanos=4_000_000_000)}
    windows = current_windows(SESSION_ONLY, stored, START_S + offset_s)
    window = windows.by_kind[SESSION]
    assert (SESSION in windows.opened) is reopened
    if reopened:
        assert window.started_at_s == START_S + offset_s
        assert window.ends_at_s == START_S + offset_s + 5 * HOUR_S
        assert window.used_nanos == 0
    else:
        assert window.started_at_s == START_S and window.used_nanos == 4_000_000_000


def test_first_request_opens_session_and_weekly_windows() -> None:
    windows = current_windows(TIER, {}, START_S)
    assert windows.opened == (SESSION, WEEKLY)
    assert windows.by_kind[WEEKLY].ends_at_s == START_S + 7 * 24 * HOUR_S
    assert windows.by_kind[WEEKLY].limit_nanos == 40_000_000_000


def test_a_clock_moved_backwards_keeps_the_window_and_says_so() -> None:
    windows = current_windows(SESSION_ONLY, {SESSION: session(1)}, START_S - 600)
    assert windows.clock_went_back
    assert windows.opened == ()
    assert windows.by_kind[SESSION].started_at_s == START_S


def test_tier_limit_of_today_applies_to_stored_windows() -> None:
    bigger = Tier("standard", session_included_nanos=9_000_000_000)
    assert with_limits(bigger, {SESSION: session()}).by_kind[SESSION].limit_nanos == 9_000_000_000


NOW_S = START_S + 60


@pytest.mark.parametrize(
    ("tier", "window", "member", "continue_requested", "expected"),
    [
        # any_remaining: admitted while anything is left, even when the worst case won't fit
        (SESSION_ONLY, session(4_999_999_999), OFF, False, Admitted(INCLUDED, 10**9)),
        (SESSION_ONLY, session(5_000_000_000), OFF, False, "blocked session disabled"),
        (SESSION_ONLY, session(5_000_000_000), ASK, False, "blocked session available"),
        (SESSION_ONLY, session(6_000_000_000), OFF, True, "blocked extra_usage_disabled disabled"),
        (SESSION_ONLY, session(5_000_000_000), ALWAYS, False, Admitted(EXTRA, 0)),
        (
            SESSION_ONLY,
            session(5_000_000_000),
            ASK,
            True,
            Admitted(EXTRA, 0, consent_until_s=START_S + 5 * HOUR_S),
        ),
        # a header asking to continue while quota remains changes nothing
        (SESSION_ONLY, session(0), OFF, True, Admitted(INCLUDED, 10**9)),
        # worst_case: the worst case must fit beside what is in flight
        (WORST_CASE, session(4_000_000_000), OFF, False, Admitted(INCLUDED, 10**9)),
        (
            WORST_CASE,
            session(4_000_000_000, reserved_nanos=1),
            OFF,
            False,
            "blocked session disabled",
        ),
    ],
)
def test_admission(
    tier: Tier, window: Window, member: MemberState, continue_requested: bool, expected: object
) -> None:
    windows = current_windows(tier, {SESSION: window}, NOW_S)
    decision = admit(
        windows, tier, 10**9, member, continue_requested=continue_requested, now_s=NOW_S
    )
    if isinstance(expected, str):
        assert isinstance(decision, Blocked)
        assert f"blocked {decision.limit} {decision.extra_usage}" == expected
    else:
        assert decision == expected


def test_consent_lasts_until_the_blocking_window_resets() -> None:
    member = MemberState(True, "ask", consent_until_s=START_S + 5 * HOUR_S)
    windows = current_windows(SESSION_ONLY, {SESSION: session(5_000_000_000)}, NOW_S)
    assert admit(
        windows, SESSION_ONLY, 1, member, continue_requested=False, now_s=NOW_S
    ) == Admitted(EXTRA, 0)
    assert not member.has_continued(START_S + 5 * HOUR_S)


def test_when_both_windows_block_the_weekly_one_is_named() -> None:
    stored = {
        SESSION: session(5_000_000_000),
        WEEKLY: Window(WEEKLY, START_S, START_S + 7 * 24 * HOUR_S, 0, 40_000_000_000),
    }
    decision = admit(
        current_windows(TIER, stored, NOW_S), TIER, 1, ASK, continue_requested=False, now_s=NOW_S
    )
    assert isinstance(decision, Blocked) and decision.limit == WEEKLY


@pytest.mark.parametrize(
    ("used_nanos", "cost_nanos", "billing", "expected"),
    [
        (0, 1_000, INCLUDED, Split(1_000, 0, 0)),
        (4_999_999_000, 3_000, INCLUDED, Split(1_000, 0, 2_000)),  # the crossing request
        (4_999_999_000, 3_000, EXTRA, Split(1_000, 2_000, 0)),  # included first, then extra
        (5_000_000_000, 3_000, EXTRA, Split(0, 3_000, 0)),
        (6_000_000_000, 3_000, INCLUDED, Split(0, 0, 3_000)),
        (0, 0, INCLUDED, Split(0, 0, 0)),
    ],
)
def test_split_charge_included_first(
    used_nanos: int, cost_nanos: int, billing: str, expected: Split
) -> None:
    windows = current_windows(SESSION_ONLY, {SESSION: session(used_nanos)}, NOW_S)
    assert split_charge(cost_nanos, windows, billing) == expected


def test_split_uses_the_tighter_of_session_and_weekly() -> None:
    stored = {
        SESSION: session(0),
        WEEKLY: Window(WEEKLY, START_S, START_S + 7 * 24 * HOUR_S, 0, 39_999_999_500),
    }
    windows = current_windows(TIER, stored, NOW_S)
    assert split_charge(2_000, windows, INCLUDED) == Split(500, 0, 1_500)


@pytest.mark.parametrize(
    ("accounts", "amount_nanos", "short"),
    [
        ([Account(ORG_MONTHLY, None)], 10**12, None),  # unlimited
        ([Account(ORG_MONTHLY, 100, used_nanos=60, reserved_nanos=30)], 10, None),
        ([Account(ORG_MONTHLY, 100, used_nanos=60, reserved_nanos=30)], 11, ORG_MONTHLY),
        (
            [Account(ORG_MONTHLY, 100, 50), Account(TIER_MONTHLY, 40, 35), Account(BALANCE, 1000)],
            6,
            TIER_MONTHLY,
        ),  # the lowest wins
        ([Account(ORG_MONTHLY, 100, 99), Account(BALANCE, 5)], 6, ORG_MONTHLY),  # the tightest
    ],
)
def test_short_account_names_the_tightest(accounts, amount_nanos: int, short: str | None) -> None:
    found = short_account(accounts, amount_nanos)
    assert (found.name if found else None) == short


@pytest.mark.parametrize(
    ("window_used_nanos", "member", "billing", "expected_nanos"),
    [
        (0, ASK, INCLUDED, 0),  # included pays; not continued: any excess is an overrun
        (4_900_000_000, ALWAYS, INCLUDED, 900_000_000),  # what included cannot cover
        (0, ALWAYS, INCLUDED, 0),
        (5_000_000_000, ALWAYS, EXTRA, 10**9),  # all of it on extra billing
    ],
)
def test_extra_to_reserve(
    window_used_nanos: int, member: MemberState, billing: str, expected_nanos: int
) -> None:
    windows = current_windows(SESSION_ONLY, {SESSION: session(window_used_nanos)}, NOW_S)
    decision = Admitted(billing, 0)
    assert extra_to_reserve(decision, windows, 10**9, member, NOW_S) == expected_nanos


@pytest.mark.parametrize(
    ("before", "after", "due"),
    [(11, 10, True), (10, 9, False), (11, 11, False), (50, -5, True), (9, 20, False)],
)
def test_reload_is_due_once_per_crossing(before: int, after: int, due: bool) -> None:
    assert reload_due(before, after, threshold_nanos=10) is due


@pytest.mark.parametrize(
    ("at_s", "timezone", "month"),
    [
        (1_769_900_399.0, "Europe/Rome", "2026-01"),  # 23:59:59 on 31 Jan in Rome
        (1_769_900_400.0, "Europe/Rome", "2026-02"),
        (1_769_900_400.0, "UTC", "2026-01"),  # still 23:00 on 31 Jan in UTC
        (1_767_225_600.0, "America/New_York", "2025-12"),
    ],
)
def test_months_are_calendar_months_in_the_org_zone(at_s: float, timezone: str, month: str) -> None:
    assert month_of(at_s, timezone) == month


def test_month_end_is_the_next_month_start_in_the_org_zone() -> None:
    assert month_end_s("2026-01", "Europe/Rome") == 1_769_900_400.0
    assert month_end_s("2025-12", "UTC") == 1_767_225_600.0


@pytest.mark.parametrize(
    "timezone", ["UTC", "Europe/Rome", "Pacific/Kiritimati", "Etc/GMT+12", "Pacific/Apia"]
)
def test_remembered_months_answer_as_month_of_does_forwards_and_back(timezone: str) -> None:
    """Every 37 minutes over three months around a year's end (and Samoa's skipped day of
    December 2011), in order and then back: the same month as `month_of` each time."""
    for start_s in (1_764_547_200.0, 1_320_105_600.0):  # 2025-12-01, 2011-11-01 (UTC)
        instants_s = [start_s + step * 37 * 60 for step in range(3 * 31 * 24 * 60 // 37)]
        months = Months()
        for at_s in instants_s + instants_s[::-1]:
            assert months.of(at_s, timezone) == month_of(at_s, timezone), at_s


@pytest.mark.parametrize(
    ("recent", "expected_nanos"),
    [([], 1_000 + 100 * 10), ([3, 7, 5], 1_000 + 7 * 10), ([500], 1_000 + 100 * 10)],
)
def test_expected_reservation(recent: list[int], expected_nanos: int) -> None:
    worst_nanos = 1_000 + 100 * 10  # input + max_tokens 100 at 10 nanos a token
    assert expected_reservation_nanos(worst_nanos, 100, 10, recent) == expected_nanos
