"""Alerts: thresholds (pure, table-tested), once per period, webhook delivery on real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from proxy.alerts import (
    Alert,
    Alerts,
    Webhook,
    WebhookSender,
    crossed_thresholds,
    month_period,
    usage_alerts,
)
from proxy.clock import FakeClock
from proxy.money import NANOS_PER_USD
from proxy.tasks import Tasks

USD = NANOS_PER_USD
SECRET = "whsec-test-0123456789"
AT_S = 1_793_491_200.0  # 2026-11-01T00:00:00Z


# --- crossed_thresholds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "limit", "thresholds", "crossed"),
    [
        pytest.param(0, 0, 100, (50, 75, 90, 100), [], id="nothing used"),
        pytest.param(0, 49, 100, (50, 75, 90, 100), [], id="just below 50"),
        pytest.param(0, 50, 100, (50, 75, 90, 100), [50], id="exactly 50 crosses it"),
        pytest.param(50, 60, 100, (50, 75, 90, 100), [], id="already at 50: not again"),
        pytest.param(49, 76, 100, (50, 75, 90, 100), [50, 75], id="two in one charge"),
        pytest.param(0, 500, 100, (50, 75, 90, 100), [50, 75, 90, 100], id="past the limit"),
        pytest.param(99, 100, 100, (50, 75, 90, 100), [100], id="reaching the limit"),
        pytest.param(100, 150, 100, (50, 75, 90, 100), [], id="over the limit already"),
        pytest.param(80, 10, 100, (50, 75, 90, 100), [], id="going down crosses nothing"),
        pytest.param(0, 10**12, 0, (50, 100), [], id="limit 0: no alerts"),
        pytest.param(0, 10**12, None, (50, 100), [], id="no limit: no alerts"),
        pytest.param(0, 10**12, -5, (50, 100), [], id="negative limit: no alerts"),
        pytest.param(0, 1, 3, (33,), [33], id="33% of 3 nanos is 0.99: 1 nano reaches it"),
        pytest.param(0, 1, 3, (34,), [], id="34% of 3 nanos is 1.02: 1 nano does not"),
        pytest.param(0, 10 * USD, 20 * USD, (90, 50, 50), [50], id="order and duplicates ignored"),
        pytest.param(
            3 * USD - 1, 3 * USD, 4 * USD, (75,), [75], id="one nano tips it (integer math)"
        ),
        pytest.param(
            333_333_333, 333_333_334, 1 * USD, (33,), [], id="33% of 1 USD is 330_000_000"
        ),
        pytest.param(0, 100, 100, (), [], id="no thresholds configured"),
    ],
)
def test_crossed_thresholds(
    before: int, after: int, limit: int | None, thresholds: tuple[int, ...], crossed: list[int]
) -> None:
    assert crossed_thresholds(before, after, limit, thresholds) == crossed


def test_crossed_thresholds_defaults_to_50_75_90_100() -> None:
    assert crossed_thresholds(0, 10, 10) == [50, 75, 90, 100]


@pytest.mark.parametrize(
    ("at_s", "timezone", "period"),
    [
        (AT_S, "UTC", "2026-11"),
        (AT_S - 1, "UTC", "2026-10"),
        (AT_S, "America/New_York", "2026-10"),  # still 31 Oct, 20:00 there
        (AT_S - 3600, "Europe/Rome", "2026-11"),  # already 1 Nov, 00:00 there
    ],
)
def test_month_period(at_s: float, timezone: str, period: str) -> None:
    assert month_period(at_s, timezone) == period


# --- Alert --------------------------------------------------------------------------------------


def session_alert(threshold_pct: int = 75, **overrides: object) -> Alert:
    fields: dict[str, object] = {
        "org_id": "acme",
        "member_email": "alice@acme.test",
        "kind": "session",
        "threshold_pct": threshold_pct,
        "period": "2026-11-01T00:00:00Z",
        "at_s": AT_S + 90,
        "used_nanos": 3_750_000_000,
        "limit_nanos": 5 * USD,
    }
    return Alert(**(fields | overrides))  # type: ignore[arg-type]


def test_payload_is_the_webhook_body() -> None:
    assert session_alert().payload() == {
        "type": "usage_alert",
        "org": "acme",
        "member": "alice@acme.test",
        "kind": "session",
        "threshold_pct": 75,
        "period": "2026-11-01T00:00:00Z",
        "used_usd": "3.75",
        "limit_usd": "5",
        "balance_usd": None,
        "amount_usd": None,
        "at": "2026-11-01T00:01:30Z",
    }


def test_payload_of_an_auto_reload() -> None:
    reload = Alert(
        org_id="acme",
        member_email=None,
        kind="auto_reload",
        threshold_pct=None,
        period="reload-17",
        at_s=AT_S,
        balance_nanos=58 * USD,
        amount_nanos=50 * USD,
    )
    assert reload.payload() | {"at": None} == {
        "type": "usage_alert",
        "org": "acme",
        "member": None,
        "kind": "auto_reload",
        "threshold_pct": None,
        "period": "reload-17",
        "used_usd": None,
        "limit_usd": None,
        "balance_usd": "58",
        "amount_usd": "50",
        "at": None,
    }
    assert reload.key == ("acme", "", "auto_reload", 0, "reload-17")


def test_key_ignores_time_and_amounts() -> None:
    assert session_alert().key == session_alert(at_s=AT_S + 999, used_nanos=4 * USD).key
    assert session_alert().key != session_alert(period="2026-11-01T05:00:00Z").key


def test_usage_alerts_builds_one_per_crossed_threshold() -> None:
    alerts = usage_alerts(
        org_id="acme",
        member_email=None,
        kind="org_monthly",
        period="2026-11",
        used_before_nanos=70 * USD,
        used_after_nanos=95 * USD,
        limit_nanos=100 * USD,
        at_s=AT_S,
    )
    assert [(a.kind, a.threshold_pct, a.used_nanos, a.limit_nanos) for a in alerts] == [
        ("org_monthly", 75, 95 * USD, 100 * USD),
        ("org_monthly", 90, 95 * USD, 100 * USD),
    ]


def test_the_webhook_secret_is_not_in_its_repr() -> None:
    assert SECRET not in repr(Webhook("http://127.0.0.1:1/hook", SECRET))


# --- webhook delivery on real sockets -----------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver answering with `statuses` in turn (then 200); records what came in."""

    statuses: list[int]
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


StartReceiver = Callable[..., Awaitable[tuple[Receiver, str]]]


@pytest.fixture
def start_receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> StartReceiver:
    async def start(*statuses: int) -> tuple[Receiver, str]:
        receiver = Receiver(list(statuses))
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        server = await aiohttp_server(app)
        return receiver, str(server.make_url("/hook"))

    return start


@pytest.fixture
def tasks() -> Tasks:
    return Tasks()


@pytest.fixture
async def sender(tasks: Tasks) -> AsyncIterator[WebhookSender]:
    sender = WebhookSender(tasks, FakeClock(AT_S + 100), attempts=3, base_delay_s=0.001)
    await sender.start()
    yield sender
    await tasks.drain()
    await sender.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


async def test_delivery_is_signed_over_the_raw_body(
    start_receiver: StartReceiver, sender: WebhookSender, tasks: Tasks
) -> None:
    receiver, url = await start_receiver()
    sender.deliver(Webhook(url, SECRET), session_alert())
    await tasks.drain()

    [(headers, body)] = receiver.received
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-usage-proxy-signature"] == f"sha256={expected}"
    assert headers["x-usage-proxy-timestamp"] == str(int(AT_S + 100))
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == session_alert().payload()


@pytest.mark.parametrize(
    ("statuses", "hits", "outcome"),
    [
        pytest.param((), 1, "webhook_delivered", id="first try"),
        pytest.param((500, 500), 3, "webhook_delivered", id="two 500s then delivered"),
        pytest.param((429,), 2, "webhook_delivered", id="429 is retried"),
        pytest.param((503, 502, 500), 3, "webhook_failed", id="5xx every time: gives up"),
        pytest.param((400,), 1, "webhook_failed", id="400 is not retried"),
        pytest.param((404,), 1, "webhook_failed", id="404 is not retried"),
        pytest.param((302,), 1, "webhook_failed", id="redirects are not followed"),
    ],
)
async def test_retries(
    start_receiver: StartReceiver,
    sender: WebhookSender,
    tasks: Tasks,
    statuses: tuple[int, ...],
    hits: int,
    outcome: str,
) -> None:
    receiver, url = await start_receiver(*statuses)
    with capture_logs() as logs:
        sender.deliver(Webhook(url, SECRET), session_alert())
        await tasks.drain()

    assert [h["x-usage-proxy-attempt"] for h, _ in receiver.received] == [
        str(n) for n in range(1, hits + 1)
    ]
    assert len({body for _, body in receiver.received}) == 1  # a retry resends the same body
    [final] = [e for e in logs if e["event"] in ("webhook_delivered", "webhook_failed")]
    assert (final["event"], final["attempts"]) == (outcome, hits)


async def test_a_dead_webhook_gives_up_after_n_attempts_without_blocking_the_caller(
    tasks: Tasks,
) -> None:
    sender = WebhookSender(tasks, FakeClock(AT_S), attempts=4, base_delay_s=0.02)
    await sender.start()
    url = closed_port_url()
    with capture_logs() as logs:
        sender.deliver(Webhook(url + "?token=abc", SECRET), session_alert())
        assert tasks.pending == 1  # deliver() returned; the delivery runs in the background
        await tasks.drain()
    await sender.close()

    retries = [e for e in logs if e["event"] == "webhook_retry"]
    [failed] = [e for e in logs if e["event"] == "webhook_failed"]
    assert [e["attempt"] for e in retries] == [1, 2, 3]
    assert failed["attempts"] == 4
    assert failed["reason"] == "ClientConnectorError"
    assert failed["webhook"] == url.removesuffix("/hook")  # no path, no query token
    assert SECRET not in repr(logs)
    assert tasks.pending == 0


def test_backoff_doubles_up_to_the_cap() -> None:
    sender = WebhookSender(Tasks(), FakeClock(), base_delay_s=0.5, max_delay_s=3.0)
    assert [sender.delay_s(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


async def test_close_ends_pending_backoffs(tasks: Tasks) -> None:
    sender = WebhookSender(tasks, FakeClock(), attempts=5, base_delay_s=60.0)
    await sender.start()
    with capture_logs() as logs:
        sender.deliver(Webhook(closed_port_url(), SECRET), session_alert())
        while not any(e["event"] == "webhook_retry" for e in logs):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        await sender.close()
        await asyncio.wait_for(tasks.drain(), timeout=5)

    [failed] = [e for e in logs if e["event"] == "webhook_failed"]
    assert (failed["attempts"], failed["reason"]) == (1, "shutting down")


# --- Alerts: once per period --------------------------------------------------------------------


class OnceStore:
    """The store's uniqueness rule, in memory: an alert's key is recorded once."""

    def __init__(self) -> None:
        self.recorded: dict[tuple[str, str, str, int, str], Alert] = {}

    async def record_alert(self, alert: Alert) -> bool:
        if alert.key in self.recorded:
            return False
        self.recorded[alert.key] = alert
        return True


async def test_an_alert_fires_once_per_period(
    start_receiver: StartReceiver, sender: WebhookSender, tasks: Tasks
) -> None:
    receiver, url = await start_receiver()
    store = OnceStore()
    alerts = Alerts(store, sender)
    webhook = Webhook(url, SECRET)

    with capture_logs() as logs:
        first = await alerts.raise_alerts([session_alert(50), session_alert(75)], webhook)
        again = await asyncio.gather(
            alerts.raise_alerts([session_alert(75, at_s=AT_S + 500)], webhook),
            alerts.raise_alerts([session_alert(75, at_s=AT_S + 501)], webhook),
        )
        next_window = await alerts.raise_alerts(
            [session_alert(75, period="2026-11-01T05:00:00Z")], webhook
        )
        await tasks.drain()

    assert (first, again, next_window) == (2, [0, 0], 1)
    assert len(store.recorded) == 3
    assert sorted(
        (json.loads(b)["threshold_pct"], json.loads(b)["period"]) for _, b in receiver.received
    ) == [
        (50, "2026-11-01T00:00:00Z"),
        (75, "2026-11-01T00:00:00Z"),
        (75, "2026-11-01T05:00:00Z"),
    ]
    assert [e["threshold_pct"] for e in logs if e["event"] == "usage_alert"] == [50, 75, 75]


async def test_without_a_webhook_alerts_are_stored_and_logged_only(
    sender: WebhookSender, tasks: Tasks
) -> None:
    store = OnceStore()
    with capture_logs() as logs:
        assert await Alerts(store, sender).raise_alerts([session_alert()], None) == 1
    assert tasks.pending == 0
    [logged] = [e for e in logs if e["event"] == "usage_alert"]
    assert (logged["org"], logged["member"], logged["kind"]) == (
        "acme",
        "alice@acme.test",
        "session",
    )


async def test_a_failing_store_does_not_fail_the_caller(sender: WebhookSender) -> None:
    class BrokenStore:
        async def record_alert(self, alert: Alert) -> bool:
            raise OSError("disk gone")

    with capture_logs() as logs:
        assert await Alerts(BrokenStore(), sender).raise_alerts([session_alert()], None) == 0
    assert [e["event"] for e in logs] == ["alert_record_failed"]
