"""The overview chart's geometry: stacked bars per day that add up, round ticks, a legend."""

from __future__ import annotations

from datetime import date

import pytest

from proxy.money import NANOS_PER_USD
from proxy.ui.chart import PALETTE, daily_chart, nice_ceiling_nanos

DAYS = [date(2026, 1, d) for d in (1, 2, 3)]


@pytest.mark.parametrize(
    ("nanos", "ceiling"),
    [(0, 1), (1, 1), (3, 5), (7, 10), (11, 20), (200, 200), (201, 500), (12_500_000, 20_000_000)],
)
def test_nice_ceiling(nanos: int, ceiling: int) -> None:
    assert nice_ceiling_nanos(nanos) == ceiling


def test_segments_stack_to_each_days_total() -> None:
    usd = NANOS_PER_USD
    chart = daily_chart(
        DAYS,
        {
            (DAYS[0], "alice", "opus"): 3 * usd,
            (DAYS[0], "bob", "opus"): 1 * usd,
            (DAYS[2], "alice", "opus"): 2 * usd,
        },
    )
    assert [t.label for t in chart.ticks] == ["$0", "$1", "$2", "$3", "$4"]
    plot_px = chart.baseline - chart.ticks[-1].y
    first_day = [s for s in chart.segments if s.x == chart.segments[0].x]
    assert sum(s.height for s in first_day) == pytest.approx(plot_px)  # $4 of a $4 scale
    assert first_day[0].y + first_day[0].height == chart.baseline
    assert first_day[1].y + first_day[1].height == pytest.approx(first_day[0].y)  # on top
    assert len(chart.segments) == 3  # nothing drawn for a day without spend
    assert [d.label for d in chart.days] == ["1", "2", "3"]
    assert [(s.name, s.total_usd) for s in chart.series] == [
        ("alice · opus", "5"),
        ("bob · opus", "1"),
    ]
    assert chart.total_usd == "6"
    assert first_day[0].label == "1 Jan · alice · opus: $3"


def test_an_empty_month_still_has_a_scale() -> None:
    chart = daily_chart(DAYS, {})
    assert chart.segments == () and chart.series == ()
    assert [t.label for t in chart.ticks] == ["$0", "$0.01", "$0.02", "$0.03", "$0.04"]


def test_colours_cycle_beyond_the_palette() -> None:
    spend = {(DAYS[0], f"m{i:02}", "model"): 1 for i in range(len(PALETTE) + 1)}
    series = daily_chart(DAYS, spend).series
    assert series[0].colour == series[-1].colour == PALETTE[0]
    assert len({s.colour for s in series}) == len(PALETTE)
