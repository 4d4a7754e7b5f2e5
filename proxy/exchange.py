"""The Exchange: everything the proxy learns about one request, carried through its phases."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.metering import Usage
from proxy.pricing import ModelPrice
from proxy.store.base import Seat


@dataclass(slots=True)
class Exchange:
    request_id: str
    started_s: float  # time.perf_counter() at arrival, for durations
    seat: Seat | None = None
    model: str | None = None
    stream: bool = False
    price: ModelPrice | None = None
    input_tokens_estimate: int = 0
    max_tokens: int = 0
    reserved_nanos: int = 0
    billing: str = "included"  # who pays: "included" quota or "extra" usage
    usage_headers: dict[str, str] = field(default_factory=dict)  # x-usage-* at admission
    admitted: bool = False  # a pending reservation exists and must be settled exactly once
    forwarded_s: float | None = None  # time.perf_counter() just before the upstream call
    upstream_status: int | None = None
    upstream_ms: float | None = None
    usage: Usage | None = None  # None: nothing billable
    cost_nanos: int = 0
    outcome: str = "unknown"
