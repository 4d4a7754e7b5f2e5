"""The async use cases of money: admit (reserve before forwarding) and settle (after)."""

from __future__ import annotations

import time

from proxy.clock import Clock
from proxy.exchange import Exchange
from proxy.metering import Usage
from proxy.pricing import PriceTable, cost_nanos, worst_case_nanos
from proxy.settings import Settings
from proxy.store.base import Reservation, Settlement, Store


class Billing:
    def __init__(self, store: Store, clock: Clock, settings: Settings) -> None:
        self._store = store
        self._clock = clock
        self._prices: PriceTable = settings.prices
        self._reservation_ttl_s = settings.store.reservation_ttl_s

    async def admit(self, ex: Exchange) -> None:
        """One store transaction: the request becomes a pending reservation of its worst case."""
        assert ex.seat is not None and ex.price is not None and ex.model is not None
        ex.reserved_nanos = worst_case_nanos(ex.price, ex.input_tokens_estimate, ex.max_tokens)
        now_s = self._clock.now_s()
        await self._store.reserve(
            Reservation(
                request_id=ex.request_id,
                member_id=ex.seat.member_id,
                org_id=ex.seat.org_id,
                model=ex.model,
                stream=ex.stream,
                reserved_nanos=ex.reserved_nanos,
                created_at_s=now_s,
                expires_at_s=now_s + self._reservation_ttl_s,
            )
        )
        ex.admitted = True

    def charge(self, ex: Exchange, usage: Usage | None) -> None:
        """Price what the response used (None: nothing billable, e.g. upstream refused)."""
        assert ex.price is not None
        ex.usage = usage
        ex.cost_nanos = (
            cost_nanos(usage, ex.price, self._prices.web_search_nanos) if usage is not None else 0
        )

    async def settle(self, ex: Exchange) -> None:
        """One store transaction: post the charge (or void); idempotent on the request id."""
        await self._store.settle(
            Settlement(
                request_id=ex.request_id,
                usage=ex.usage,
                cost_nanos=ex.cost_nanos,
                upstream_status=ex.upstream_status,
                outcome=ex.outcome,
                settled_at_s=self._clock.now_s(),
                upstream_ms=ex.upstream_ms,
                duration_ms=(time.perf_counter() - ex.started_s) * 1000,
            )
        )

    async def expire_pending(self) -> int:
        return await self._store.expire_pending(self._clock.now_s())
