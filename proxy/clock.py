"""Time comes from a Clock so tests (and the demo) can move it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_s(self) -> float:
        """Seconds since the Unix epoch (UTC)."""
        ...


class SystemClock:
    def now_s(self) -> float:
        return time.time()  # noqa: TID251 - the one place wall time is read


class FakeClock:
    """A clock that only moves when told to; for tests and the `--demo` clock endpoint."""

    def __init__(self, start_s: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now_s = start_s

    def now_s(self) -> float:
        return self._now_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("advance() only moves forward; use set_s() to go back")
        self._now_s += seconds

    def set_s(self, now_s: float) -> None:
        """Put the clock anywhere, backwards too (as a badly set system clock would)."""
        self._now_s = now_s


class OffsetClock:
    """The system clock plus an offset that only grows: the demo's movable clock."""

    def __init__(self, base: Clock | None = None) -> None:
        self._base = base or SystemClock()
        self.offset_s = 0.0

    def now_s(self) -> float:
        return self._base.now_s() + self.offset_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.offset_s += seconds
