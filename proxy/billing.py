"""The async use cases of money: admit (reserve before forwarding) and settle (after)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Protocol

import structlog

from proxy.alerts import Alert, Alerts, Webhook, crossed_thresholds, usage_alerts
from proxy.clock import Clock
from proxy.continuation import ContinueLinks
from proxy.exchange import Exchange
from proxy.ledger import (
    BALANCE,
    ORG_MONTHLY,
    SESSION,
    WEEKLY,
    Admitted,
    Blocked,
    ReloadOrder,
    Unaffordable,
    headroom_nanos,
    reload_due,
)
from proxy.metering import Usage
from proxy.money import format_usd
from proxy.pricing import PriceTable, cost_nanos, worst_case_nanos
from proxy.refusals import limit_refusal, money_refusal, rfc3339, window_headers
from proxy.settings import Settings
from proxy.store.base import (
    Admission,
    AdmissionRequest,
    MemberStatus,
    Settled,
    Settlement,
    Store,
    StoreUnavailable,
)
from proxy.tasks import Tasks

log = structlog.get_logger("proxy.billing")


class PaymentProvider(Protocol):
    async def charge(self, org_id: str, amount_nanos: int, idempotency_key: str) -> bool:
        """Take payment for prepaid credits; True when paid (retries must be idempotent)."""
        ...


class LedgerPayments:
    """The default provider: no card is charged; the purchase is recorded in the ledger."""

    async def charge(self, org_id: str, amount_nanos: int, idempotency_key: str) -> bool:
        return True


class Billing:
    """Admission before forwarding and settlement after, each one store transaction; then
    auto-reloads and alerts, off the request path."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        settings: Settings,
        links: ContinueLinks,
        tasks: Tasks,
        payments: PaymentProvider,
        alerts: Alerts,
    ) -> None:
        self._alerts = alerts
        self._store = store
        self._tasks = tasks
        self._payments = payments
        self._clock = clock
        self._prices: PriceTable = settings.prices
        self._tiers = settings.plans.tiers
        self._reservation_ttl_s = settings.store.reservation_ttl_s
        self._settle_retry_s = settings.store.settle_retry_s
        self._thresholds_pct = settings.alerts.thresholds_pct
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
                max_tokens=ex.max_tokens,
                output_nanos_per_token=ex.price.rates_for(ex.input_tokens_estimate).output_nanos,
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
        if isinstance(decision, Unaffordable):
            raise money_refusal(decision, seat=ex.seat, funds=admission.funds)
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
        settled = await self._settle_retrying(settlement)
        if settled is None:
            return
        webhook = _webhook(settled.webhook)
        if settled.reload is not None:
            self._tasks.spawn(self._reload(settled.reload, webhook), name=f"reload {ex.request_id}")
        alerts = settlement_alerts(settled, settlement.settled_at_s, self._thresholds_pct)
        await self._alerts.raise_alerts(alerts, webhook)

    async def _settle_retrying(self, settlement: Settlement) -> Settled | None:
        """Settle; while the store is unreachable (a restart), try again with backoff for up to
        `store.settle_retry_s`. Settling is idempotent on the request id, so a retry after a
        commit whose answer was lost posts nothing twice. Past the bound the reservation stays
        pending and the sweeper of any replica expires it."""
        deadline_s = time.monotonic() + self._settle_retry_s
        delay_s = 0.05
        while True:
            try:
                return await self._store.settle(settlement, self._tiers)
            except StoreUnavailable as exc:
                if time.monotonic() + delay_s > deadline_s:
                    log.error("settle_gave_up", request_id=settlement.request_id, reason=str(exc))
                    raise
                log.warning("settle_retrying", request_id=settlement.request_id, reason=str(exc))
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    async def _reload(self, order: ReloadOrder, webhook: Webhook | None) -> None:
        """Buy an auto-reload off the request path; a failure is recorded, logged and alerted."""
        try:
            paid = await self._payments.charge(
                order.org_id, order.amount_nanos, order.idempotency_key
            )
        except Exception:
            log.exception("reload_provider_failed", org=order.org_id)
            paid = False
        now_s = self._clock.now_s()
        await self._store.finish_reload(order, paid, now_s)
        alert = Alert(
            org_id=order.org_id,
            member_email=None,
            kind="auto_reload" if paid else "auto_reload_failed",
            threshold_pct=None,
            period=order.idempotency_key,
            at_s=now_s,
            amount_nanos=order.amount_nanos,
        )
        await self._alerts.raise_alerts([alert], webhook)

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
        "x-usage-extra-remaining": extra_remaining(admission),
    }
    return headers


def extra_remaining(admission: Admission) -> str:
    """What extra usage can still spend for this member (USD), or "unlimited"."""
    if not admission.member.extra_usage_enabled:
        return "0"
    room_nanos = headroom_nanos(list(admission.funds.accounts))
    return "unlimited" if room_nanos is None else format_usd(room_nanos)


def _webhook(configured: tuple[str, str] | None) -> Webhook | None:
    """The org's webhook, its secret read from the variable that orgs.toml names."""
    if configured is None:
        return None
    url, secret_env = configured
    return Webhook(url, os.environ.get(secret_env, ""))


def settlement_alerts(
    settled: Settled, at_s: float, thresholds_pct: tuple[int, ...]
) -> list[Alert]:
    """The alerts one settlement raises: thresholds of the session window, the member's and the
    org's monthly limits that it crossed, and a prepaid balance falling to its threshold."""
    alerts: list[Alert] = []
    split = settled.split
    session = settled.windows_before.get(SESSION)
    if session is not None:
        after_nanos = session.used_nanos + split.included_nanos + split.overrun_nanos
        limit_nanos = session.limit_nanos
        # the window's start is formatted only when a threshold was crossed (2 us a request)
        if crossed_thresholds(session.used_nanos, after_nanos, limit_nanos, thresholds_pct):
            alerts += usage_alerts(
                org_id=settled.org_id,
                member_email=settled.member_email,
                kind="session",
                period=rfc3339(session.started_at_s),
                used_before_nanos=session.used_nanos,
                used_after_nanos=after_nanos,
                limit_nanos=limit_nanos,
                at_s=at_s,
                thresholds_pct=thresholds_pct,
            )
    funds = settled.funds_before
    if funds is None or not split.extra_nanos:
        return alerts
    for account in funds.accounts:
        if account.name == BALANCE:
            continue
        org_level = account.name == ORG_MONTHLY
        alerts += usage_alerts(
            org_id=settled.org_id,
            member_email=None if org_level else settled.member_email,
            kind="org_monthly" if org_level else "member_monthly",
            period=funds.month,
            used_before_nanos=account.used_nanos,
            used_after_nanos=account.used_nanos + split.extra_nanos,
            limit_nanos=account.limit_nanos,
            at_s=at_s,
            thresholds_pct=thresholds_pct,
        )
    after_nanos, threshold_nanos = settled.balance_after_nanos, settled.reload_threshold_nanos
    if (
        after_nanos is not None
        and threshold_nanos is not None
        and reload_due(after_nanos + split.extra_nanos, after_nanos, threshold_nanos)
    ):
        alerts.append(
            Alert(
                org_id=settled.org_id,
                member_email=None,
                kind="balance_low",
                threshold_pct=None,
                period=settled.request_id,
                at_s=at_s,
                balance_nanos=after_nanos,
                limit_nanos=threshold_nanos,
            )
        )
    return alerts
