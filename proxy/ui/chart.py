"""Pure: the geometry of the overview's chart (daily spend, stacked by member and model), drawn
as inline SVG by the template. Money stays integer nanos; only pixel positions are floats."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from proxy.money import NANOS_PER_USD, format_usd

# Okabe-Ito: distinguishable with the common colour-vision deficiencies; cycled beyond eight
# series (the legend and the table beside the chart still tell them apart).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C6D00", "#000000")
WIDTH_PX = 720
HEIGHT_PX = 260
LEFT_PX = 64  # room for the amounts on the y axis
BOTTOM_PX = 28  # room for the day numbers
TOP_PX = 10
TICKS = 4
MIN_TICK_NANOS = NANOS_PER_USD // 100  # an empty month still shows a scale ($0.01 a tick)


@dataclass(frozen=True, slots=True)
class Segment:
    x: float
    y: float
    width: float
    height: float
    colour: str
    label: str  # "3 Jan · alice@acme.test · claude-opus-4-8: $1.25"


@dataclass(frozen=True, slots=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True, slots=True)
class DayLabel:
    x: float
    label: str


@dataclass(frozen=True, slots=True)
class Series:
    name: str  # "alice@acme.test · claude-opus-4-8"
    colour: str
    total_usd: str


@dataclass(frozen=True, slots=True)
class DailyChart:
    width: int
    height: int
    left: int
    baseline: float
    segments: tuple[Segment, ...]
    ticks: tuple[Tick, ...]
    days: tuple[DayLabel, ...]
    series: tuple[Series, ...]
    total_usd: str


def nice_ceiling_nanos(nanos: int) -> int:
    """The smallest 1, 2 or 5 x 10^k nanos (k >= 0) that is at least `nanos`, for round ticks."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= nanos:
                return step * factor
        step *= 10


def daily_chart(
    days: Sequence[date], spend_nanos: Mapping[tuple[date, str, str], int]
) -> DailyChart:
    """Bars for `days` (the month so far); `spend_nanos` by (day, member, model)."""
    names = sorted({(member, model) for _, member, model in spend_nanos})
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    per_day = {day: sum(n for (d, _, _), n in spend_nanos.items() if d == day) for day in days}
    peak_nanos = max(per_day.values(), default=0)
    tick_nanos = nice_ceiling_nanos(max(-(-peak_nanos // TICKS), MIN_TICK_NANOS))
    top_nanos = tick_nanos * TICKS
    plot_px = HEIGHT_PX - TOP_PX - BOTTOM_PX
    baseline = float(HEIGHT_PX - BOTTOM_PX)
    slot_px = (WIDTH_PX - LEFT_PX) / max(len(days), 1)
    bar_px = max(slot_px * 0.7, 1.0)

    segments: list[Segment] = []
    labels: list[DayLabel] = []
    for i, day in enumerate(days):
        x = LEFT_PX + i * slot_px + (slot_px - bar_px) / 2
        labels.append(DayLabel(x + bar_px / 2, str(day.day)))
        y = baseline
        for name in names:
            nanos = spend_nanos.get((day, *name), 0)
            if nanos <= 0:
                continue
            height = plot_px * nanos / top_nanos
            y -= height
            segments.append(
                Segment(
                    x,
                    y,
                    bar_px,
                    height,
                    colours[name],
                    f"{day.day} {day:%b} · {name[0]} · {name[1]}: ${format_usd(nanos)}",
                )
            )
    ticks = tuple(
        Tick(baseline - plot_px * k / TICKS, f"${format_usd(tick_nanos * k)}")
        for k in range(TICKS + 1)
    )
    series = tuple(
        Series(
            f"{member} · {model}",
            colours[(member, model)],
            format_usd(
                sum(n for (_, m, mo), n in spend_nanos.items() if (m, mo) == (member, model))
            ),
        )
        for member, model in names
    )
    return DailyChart(
        width=WIDTH_PX,
        height=HEIGHT_PX,
        left=LEFT_PX,
        baseline=baseline,
        segments=tuple(segments),
        ticks=ticks,
        days=tuple(labels),
        series=series,
        total_usd=format_usd(sum(spend_nanos.values())),
    )
