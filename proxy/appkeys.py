"""Typed keys for what the app and each request carry (the only way state is shared)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # the names in the keys' string annotations below
    from proxy.alerts import WebhookSender  # noqa: F401
    from proxy.auth import KeyCache  # noqa: F401
    from proxy.billing import Billing, PaymentProvider  # noqa: F401
    from proxy.clock import Clock  # noqa: F401
    from proxy.exchange import Exchange  # noqa: F401
    from proxy.metrics import Metrics  # noqa: F401
    from proxy.settings import Settings  # noqa: F401
    from proxy.store.base import Store  # noqa: F401
    from proxy.tasks import Tasks  # noqa: F401
    from proxy.tokens import TokenCounter  # noqa: F401
    from proxy.ui.sessions import Sessions  # noqa: F401
    from proxy.upstream import Upstream  # noqa: F401

SETTINGS = web.AppKey["Settings"]("settings")
CLOCK = web.AppKey["Clock"]("clock")
STORE = web.AppKey["Store"]("store")
KEYS = web.AppKey["KeyCache"]("keys")
BILLING = web.AppKey["Billing"]("billing")
UPSTREAM = web.AppKey["Upstream"]("upstream")
TASKS = web.AppKey["Tasks"]("tasks")
TOKENS = web.AppKey["TokenCounter"]("tokens")
PAYMENTS = web.AppKey["PaymentProvider"]("payments")
WEBHOOKS = web.AppKey["WebhookSender"]("webhooks")
METRICS = web.AppKey["Metrics"]("metrics")
SESSIONS = web.AppKey["Sessions"]("sessions")  # the web pages' sign-ins

EXCHANGE = web.RequestKey["Exchange"]("exchange")
