"""Typed keys for what the app and each request carry (the only way state is shared)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    pass

SETTINGS = web.AppKey["Settings"]("settings")
CLOCK = web.AppKey["Clock"]("clock")
STORE = web.AppKey["Store"]("store")
KEYS = web.AppKey["KeyCache"]("keys")
BILLING = web.AppKey["Billing"]("billing")
UPSTREAM = web.AppKey["Upstream"]("upstream")
TASKS = web.AppKey["Tasks"]("tasks")
TOKENS = web.AppKey["TokenCounter"]("tokens")
PAYMENTS = web.AppKey["PaymentProvider"]("payments")

EXCHANGE = web.RequestKey["Exchange"]("exchange")
