"""Usage alerts: which thresholds a charge crossed, once per period, and webhook delivery.

An alert is decided by pure code (`crossed_thresholds`, `usage_alerts`), recorded by the store
(which alone decides, atomically, whether it already fired in its period), logged, and POSTed to
the org's webhook in a tracked background task that retries with exponential backoff. Nothing
here ever blocks or fails a request: a dead webhook only logs `webhook_failed`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

import aiohttp
import structlog
from yarl import URL

from proxy import __version__
from proxy.clock import Clock
from proxy.money import format_usd
from proxy.tasks import Tasks

log = structlog.get_logger("proxy.alerts")

DEFAULT_THRESHOLDS_PCT = (50, 75, 90, 100)

SIGNATURE_HEADER = "x-usage-proxy-signature"
TIMESTAMP_HEADER = "x-usage-proxy-timestamp"
ATTEMPT_HEADER = "x-usage-proxy-attempt"

AlertKind = Literal[
    "session",  # a member's session window; period = the window's start (RFC 3339)
    "member_monthly",  # a member's monthly extra-usage limit; period = "YYYY-MM"
    "org_monthly",  # the org's monthly limit; period = "YYYY-MM"
    "balance_low",  # prepaid balance at or below the reload threshold; period = one crossing
    "auto_reload",  # a reload posted; period = the reload's id
    "auto_reload_failed",  # a reload that could not be made; period = the attempt's id
]


def crossed_thresholds(
    used_before_nanos: int,
    used_after_nanos: int,
    limit_nanos: int | None,
    thresholds_pct: Iterable[int] = DEFAULT_THRESHOLDS_PCT,
) -> list[int]:
    """The thresholds (percent of the limit) passed by going from `before` to `after`.

    A threshold t is crossed when before < t% of limit <= after, compared in integers
    (before * 100 < t * limit <= after * 100). No limit (None or 0 or less) crosses nothing.
    """
    if not limit_nanos or limit_nanos <= 0:
        return []
    return sorted(
        {
            t
            for t in thresholds_pct
            if used_before_nanos * 100 < t * limit_nanos <= used_after_nanos * 100
        }
    )


def month_period(at_s: float, timezone: str = "UTC") -> str:
    """The calendar month ("2026-11") that `at_s` falls in, in the org's time zone."""
    return datetime.fromtimestamp(at_s, ZoneInfo(timezone)).strftime("%Y-%m")


def _rfc3339(at_s: float) -> str:
    return datetime.fromtimestamp(at_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _usd(nanos: int | None) -> str | None:
    return None if nanos is None else format_usd(nanos)


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert. Money in nanos; which amounts are set depends on the kind:

    - session / member_monthly / org_monthly: used and limit (threshold_pct set);
    - balance_low: balance, and limit = the reload threshold (the low mark);
    - auto_reload / auto_reload_failed: amount (the reload), balance (after it, or as it stands).
    """

    org_id: str
    member_email: str | None
    kind: AlertKind
    threshold_pct: int | None
    period: str
    at_s: float
    used_nanos: int | None = None
    limit_nanos: int | None = None
    balance_nanos: int | None = None
    amount_nanos: int | None = None

    @property
    def key(self) -> tuple[str, str, str, int, str]:
        """What makes an alert unique (it fires once per key). None becomes "" and 0, since SQL
        unique constraints treat NULLs as distinct; store these values, not NULLs."""
        return (
            self.org_id,
            self.member_email or "",
            self.kind,
            self.threshold_pct or 0,
            self.period,
        )

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON body (every key always present; null where it does not apply)."""
        return {
            "type": "usage_alert",
            "org": self.org_id,
            "member": self.member_email,
            "kind": self.kind,
            "threshold_pct": self.threshold_pct,
            "period": self.period,
            "used_usd": _usd(self.used_nanos),
            "limit_usd": _usd(self.limit_nanos),
            "balance_usd": _usd(self.balance_nanos),
            "amount_usd": _usd(self.amount_nanos),
            "at": _rfc3339(self.at_s),
        }


def usage_alerts(
    *,
    org_id: str,
    member_email: str | None,
    kind: Literal["session", "member_monthly", "org_monthly"],
    period: str,
    used_before_nanos: int,
    used_after_nanos: int,
    limit_nanos: int | None,
    at_s: float,
    thresholds_pct: Sequence[int] = DEFAULT_THRESHOLDS_PCT,
) -> list[Alert]:
    """One Alert per threshold that a charge (before -> after) crossed."""
    return [
        Alert(
            org_id=org_id,
            member_email=member_email,
            kind=kind,
            threshold_pct=t,
            period=period,
            at_s=at_s,
            used_nanos=used_after_nanos,
            limit_nanos=limit_nanos,
        )
        for t in crossed_thresholds(
            used_before_nanos, used_after_nanos, limit_nanos, thresholds_pct
        )
    ]


class AlertStore(Protocol):
    async def record_alert(self, alert: Alert) -> bool:
        """Store the alert; True when new, False when its `key` already fired. Atomic: of many
        concurrent calls with one key, exactly one returns True."""
        ...


@dataclass(frozen=True, slots=True)
class Webhook:
    """An org's webhook; the secret is never shown in reprs or logs."""

    url: str
    secret: str = field(repr=False)


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: "sha256=" + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _where(url: str) -> str:
    """The URL for logs, without credentials, path or query (those may hold tokens)."""
    try:
        return str(URL(url).origin())
    except ValueError:
        return "<invalid url>"


class WebhookSender:
    """POSTs alerts in tracked background tasks; retries connection errors, timeouts, 429 and
    5xx with exponential backoff (base, 2*base, 4*base ... capped), up to `attempts` tries."""

    def __init__(
        self,
        tasks: Tasks,
        clock: Clock,
        *,
        attempts: int = 5,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be 1 or more")
        self._tasks = tasks
        self._clock = clock
        self._attempts = attempts
        self._base_delay_s = base_delay_s
        self._max_delay_s = max_delay_s
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = asyncio.Event()

    async def start(self) -> None:
        self._closed.clear()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers={"user-agent": f"usage-proxy/{__version__}"},
        )

    def stop_retrying(self) -> None:
        """Shutting down: pending backoff waits end at once and no attempt is retried, so
        draining the tasks never waits on a dead webhook. Deliveries in flight still finish."""
        self._closed.set()

    async def close(self) -> None:
        """Stop retrying and close the session (drain the tasks first)."""
        self._closed.set()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def deliver(self, webhook: Webhook, alert: Alert) -> None:
        """Send in the background; returns at once and never raises for delivery failures."""
        if self._session is None:  # not started, or already shut down: the alert is stored
            log.warning("webhook_skipped", org=alert.org_id, kind=alert.kind, reason="closed")
            return
        body = json.dumps(alert.payload(), separators=(",", ":"), sort_keys=True).encode()
        self._tasks.spawn(
            self._send(self._session, webhook, body, alert),
            name=f"webhook {alert.kind} {alert.org_id}",
        )

    def delay_s(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        return min(self._base_delay_s * 2 ** (attempt - 1), self._max_delay_s)

    async def _send(
        self, session: aiohttp.ClientSession, webhook: Webhook, body: bytes, alert: Alert
    ) -> None:
        fields = {"org": alert.org_id, "kind": alert.kind, "webhook": _where(webhook.url)}
        headers = {"content-type": "application/json", SIGNATURE_HEADER: sign(body, webhook.secret)}
        reason = "no attempt"
        for attempt in range(1, self._attempts + 1):
            headers[TIMESTAMP_HEADER] = str(int(self._clock.now_s()))
            headers[ATTEMPT_HEADER] = str(attempt)
            try:
                async with session.post(
                    webhook.url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    await response.read()
            except aiohttp.InvalidURL:
                log.error("webhook_failed", **fields, attempts=attempt, reason="invalid url")
                return
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, reason = None, type(exc).__name__
            if status is not None:
                if 200 <= status < 300:
                    log.info("webhook_delivered", **fields, attempts=attempt, status=status)
                    return
                reason = f"status {status}"
                if status != 429 and status < 500:  # the receiver refused it: retrying won't help
                    log.error("webhook_failed", **fields, attempts=attempt, reason=reason)
                    return
            if attempt == self._attempts:
                break
            log.warning("webhook_retry", **fields, attempt=attempt, reason=reason)
            try:
                await asyncio.wait_for(self._closed.wait(), self.delay_s(attempt))
            except TimeoutError:
                continue
            reason = "shutting down"
            break
        log.error("webhook_failed", **fields, attempts=attempt, reason=reason)


class Alerts:
    """Records alerts (once per period), logs each new one, and sends it to the org's webhook."""

    def __init__(self, store: AlertStore, sender: WebhookSender) -> None:
        self._store = store
        self._sender = sender

    async def raise_alerts(self, alerts: Sequence[Alert], webhook: Webhook | None) -> int:
        """Returns how many were new. Store errors are logged, never raised: alerts are a side
        channel and must not fail the settlement that raised them."""
        new = 0
        for alert in alerts:
            try:
                fresh = await self._store.record_alert(alert)
            except Exception:
                log.exception("alert_record_failed", org=alert.org_id, kind=alert.kind)
                continue
            if not fresh:
                continue
            new += 1
            payload = alert.payload()
            del payload["type"]
            log.info("usage_alert", **payload)
            if webhook is not None:
                self._sender.deliver(webhook, alert)
        return new
