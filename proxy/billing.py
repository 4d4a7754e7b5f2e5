"""The async use cases of money: admit (reserve before forwarding) and settle (after)."""

from __future__ import annotations

import time

import structlog

from proxy.clock import Clock
from proxy.continuation import ContinueLinks
from proxy.exchange import Exchange
from proxy.ledger import SESSION, WEEKLY, Admitted, Blocked
from proxy.metering import Usage
from proxy.pricing import PriceTable, cost_nanos, worst_case_nanos
from proxy.refusals import limit_refusal, window_headers
from proxy.settings import Settings
from proxy.store.base import Admission, AdmissionRequest, MemberStatus, Settlement, Store

log = structlog.get_logger("proxy.billing")


class Billing:
    def __init__(
        self, store: Store, clock: Clock, settings: Settings, links: ContinueLinks
    ) -> None:
        self._store = store
        self._clock = clock
        self._prices: PriceTable = settings.prices
        self._tiers = settings.plans.tiers
        self._reservation_ttl_s = settings.store.reservation_ttl_s
        self.links = links

    async def admit(self, ex: Exchange, *, continue_requested: bool) -> None:
        """One store transaction: decide who pays and reserve the worst case, or refuse."""
        assert ex.seat is not None and ex.price is not None and ex.model is not None
        ex.reserved_nanos = worst_case_nanos(ex.price, ex.input_tokens_estimate, ex.max_tokens)
        now_s = self._clock.now_s()
        admission = await self._store.admit(
            AdmissionRequest(
                request_id=ex.request_id,
                member_id=ex.seat.member_id,
                org_id=ex.seat.org_id,
                model=ex.model,
                stream=ex.stream,
                worst_case_nanos=ex.reserved_nanos,
                continue_requested=continue_requested,
                created_at_s=now_s,
                expires_at_s=now_s + self._reservation_ttl_s,
            ),
            self._tiers,
        )
        if admission.windows.clock_went_back:
            log.warning("clock_went_back", member=ex.seat.email, now_s=now_s)
        decision = admission.decision
        if isinstance(decision, Blocked):
            url = None
            if decision.extra_usage == "available":
                url = self.links.url(ex.seat.member_id, decision.window.ends_at_s)
            raise limit_refusal(decision, seat=ex.seat, now_s=now_s, continue_url=url)
        ex.admitted = True
        ex.billing = decision.billing
        ex.usage_headers = usage_headers(admission, decision)

    def charge(self, ex: Exchange, usage: Usage | None) -> None:
        """Price what the response used (None: nothing billable, e.g. upstream refused)."""
        assert ex.price is not None
        ex.usage = usage
        ex.cost_nanos = (
            cost_nanos(usage, ex.price, self._prices.web_search_nanos) if usage is not None else 0
        )

    async def settle(self, ex: Exchange) -> None:
        """One store transaction: post the charge (or void); idempotent on the request id."""
        settlement = Settlement(
            request_id=ex.request_id,
            usage=ex.usage,
            cost_nanos=ex.cost_nanos,
            upstream_status=ex.upstream_status,
            outcome=ex.outcome,
            settled_at_s=self._clock.now_s(),
            upstream_ms=ex.upstream_ms,
            duration_ms=(time.perf_counter() - ex.started_s) * 1000,
        )
        await self._store.settle(settlement, self._tiers)

    async def expire_pending(self) -> int:
        return await self._store.expire_pending(self._clock.now_s())

    async def status(self, member_id: int) -> MemberStatus:
        return await self._store.member_status(member_id, self._tiers, self._clock.now_s())

    async def continue_extra_usage(self, member_id: int) -> MemberStatus:
        return await self._store.continue_extra_usage(member_id, self._tiers, self._clock.now_s())


def usage_headers(admission: Admission, decision: Admitted) -> dict[str, str]:
    """The member's state at admission, on every metered response (SPEC §7)."""
    headers = {
        **window_headers(admission.windows.get(SESSION), SESSION),
        **window_headers(admission.windows.get(WEEKLY), WEEKLY),
        "x-usage-billing": decision.billing,
        # money limits and balances arrive with extra-usage billing; until then it is all or none
        "x-usage-extra-remaining": "unlimited" if admission.member.extra_usage_enabled else "0",
    }
    return headers
