"""create_app: the one place where the proxy is wired together."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web

from proxy import handlers, pages
from proxy.admin import routes as admin_routes
from proxy.alerts import Alerts, WebhookSender
from proxy.appkeys import (
    BILLING,
    CLOCK,
    KEYS,
    METRICS,
    PAYMENTS,
    SETTINGS,
    STORE,
    TASKS,
    TOKENS,
    UPSTREAM,
    WEBHOOKS,
)
from proxy.auth import KeyCache
from proxy.billing import Billing, LedgerPayments, PaymentProvider
from proxy.clock import Clock, SystemClock
from proxy.continuation import ContinueLinks
from proxy.errors import bad_request
from proxy.front import FrontRunner
from proxy.metrics import Metrics, scrape
from proxy.middlewares import exchange_middleware, serve_lean
from proxy.orgfile import load_orgs
from proxy.refusals import rfc3339
from proxy.settings import Settings
from proxy.store import open_store
from proxy.tasks import Tasks
from proxy.tokens import TokenCounter
from proxy.ui import views as ui_views
from proxy.upstream import Upstream

log = structlog.get_logger("proxy.app")


def create_app(
    settings: Settings, *, clock: Clock | None = None, payments: PaymentProvider | None = None
) -> web.Application:
    """The proxy, wired: `clock` and `payments` (the provider that buys credits) are seams for
    tests and deployments; by default the system clock and a ledger-only provider."""
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[exchange_middleware],
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock or SystemClock()
    app[TOKENS] = TokenCounter()
    app[TASKS] = Tasks()
    app[UPSTREAM] = Upstream(settings.upstream)
    app[PAYMENTS] = payments or LedgerPayments()
    app[WEBHOOKS] = WebhookSender(app[TASKS], app[CLOCK])
    app[METRICS] = Metrics(app[TASKS])
    # Exit runs in reverse: drain tasks (settlements), then close upstream, then the store.
    app.cleanup_ctx.extend([_store_ctx, _upstream_ctx, _tasks_ctx])

    app.router.add_route("HEAD", "/", handlers.head_root)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", scrape)  # unauthenticated: keep it off the public side
    app.router.add_post("/v1/messages", handlers.messages_route)
    app.router.add_post("/v1/extra-usage/continue", handlers.continue_extra_usage)
    app.router.add_get("/v1/usage", handlers.member_usage)
    app.router.add_get("/continue/{token}", pages.continue_page)
    app.router.add_post("/continue/{token}", pages.confirm_continue)
    if settings.demo:
        app.router.add_post("/admin/v1/clock", _advance_clock)
    app.router.add_route("*", "/v1/{tail:.*}", handlers.passthrough)
    admin_routes.setup(app)
    ui_views.setup(app)  # the web pages under /ui/
    return app


def front_runner(app: web.Application, **kwargs: Any) -> FrontRunner:
    """The runner that serves `app`: /v1/messages on the lean front, the rest on aiohttp
    (front.py); `kwargs` are aiohttp's AppRunner's. Both close a connection idle for
    server.idle_timeout_s."""
    server = app[SETTINGS].server
    return FrontRunner(
        app,
        functools.partial(serve_lean, app),
        max_body_bytes=server.max_body_bytes,
        idle_timeout_s=server.idle_timeout_s,
        keepalive_timeout=server.idle_timeout_s,
        **kwargs,
    )


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = await open_store(settings.store)
    try:
        if settings.orgs_file is not None:
            await store.apply_orgs(
                load_orgs(settings.orgs_file, settings.plans), app[CLOCK].now_s()
            )
        app[STORE] = store
        app[METRICS].watch_store(store)
        app[KEYS] = KeyCache(store, app[CLOCK], settings.server.key_cache_s, app[TASKS])
        links = ContinueLinks(await store.secret("continue_link"), settings.server.public_url)
        alerts = Alerts(store, app[WEBHOOKS])
        app[BILLING] = Billing(
            store, app[CLOCK], settings, links, app[TASKS], app[PAYMENTS], alerts
        )
        yield
    finally:
        await store.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """The outbound HTTP clients: the upstream API and the webhooks."""
    await app[UPSTREAM].start()
    await app[WEBHOOKS].start()
    yield
    await app[WEBHOOKS].close()
    await app[UPSTREAM].close()


async def _tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    tasks = app[TASKS]
    sweeper = tasks.spawn(
        _sweep(app[BILLING], app[SETTINGS].store.sweep_interval_s), name="reservation sweeper"
    )
    yield
    sweeper.cancel()
    app[WEBHOOKS].stop_retrying()  # a dead webhook must not hold up the shutdown
    await tasks.drain()


async def _sweep(billing: Billing, interval_s: float) -> None:
    """Expire reservations that no process settled (a crash); the first pass runs at start."""
    while True:
        try:
            expired = await billing.expire_pending()
            if expired:
                log.warning("reservations_expired", count=expired)
        except Exception:
            log.exception("sweep_failed")
        await asyncio.sleep(interval_s)


async def _advance_clock(request: web.Request) -> web.Response:
    """Demo only: move the clock forward, to watch a window reset in seconds."""
    try:
        advance_s = (await request.json())["advance_s"]
    except (ValueError, KeyError, TypeError):
        advance_s = None
    if not isinstance(advance_s, int | float) or isinstance(advance_s, bool) or advance_s < 0:
        raise bad_request("advance_s: Field required (a number of seconds, 0 or more).")
    clock = request.app[CLOCK]
    clock.advance(advance_s)  # type: ignore[attr-defined]  # demo clocks can move
    return web.json_response({"now": rfc3339(clock.now_s())})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(request.app[STORE].ping(), timeout=2.0)
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "store unreachable"}, status=503)
