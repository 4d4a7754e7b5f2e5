"""The Exchange: everything the proxy learns about one request, carried through its phases."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from proxy.metering import Usage
from proxy.pricing import ModelPrice
from proxy.store.base import Seat


def new_request_id(at_ms: int) -> str:
    """`req_proxy_` and 32 hex digits: the millisecond the request arrived (12 digits), then 80
    random bits. Ids made later sort later, so the stores' primary-key index takes each new
    request at its right-hand edge, a few pages that stay in cache, rather than at a random page
    of an index that grows with every request (SQLite, measured: an admission's INSERT 54 -> 19
    us and a settlement's UPDATE 24 -> 12 us with 200,000 requests stored)."""
    return f"req_proxy_{at_ms & 0xFFFF_FFFF_FFFF:012x}{os.urandom(10).hex()}"


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
