"""Per-request frame: an id and log context, Anthropic-shaped errors, the canonical log line."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from proxy import handlers
from proxy.appkeys import EXCHANGE, METRICS
from proxy.errors import Refusal, error_body
from proxy.exchange import Exchange, new_request_id
from proxy.front import LeanCall
from proxy.logs import request_line
from proxy.metrics import Metrics
from proxy.store.base import StoreUnavailable

log = structlog.get_logger("proxy.request")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTTP_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
}


@web.middleware
async def exchange_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ex = request[EXCHANGE] = open_exchange()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if ex.outcome == "unknown":
            ex.outcome = "ok" if status < 400 else "error"
        return response
    except Exception as exc:
        status, body, headers = failure(ex, exc, request.method, request.path)
        return web.json_response(body, status=status, headers=headers)
    finally:
        close_exchange(
            request.app[METRICS],
            ex,
            method=request.method,
            path=_loggable(request),
            route=_route(request),
            status=status,
        )


async def serve_lean(app: web.Application, call: LeanCall) -> None:
    """The lean front's requests (front.py: POST /v1/messages, HEAD /) in the same frame as the
    middleware gives aiohttp's."""
    ex = open_exchange()
    status = 500
    try:
        if call.method == "HEAD":  # HEAD /: Claude Code's pre-connect
            await call.respond(200, {}, b"")
        else:
            await handlers.messages(app, ex, call)
        status = call.status
        if ex.outcome == "unknown":
            ex.outcome = "ok" if status < 400 else "error"
    except Exception as exc:
        status, body, headers = failure(ex, exc, call.method, call.path)
        if call.started:
            call.abort()
        else:
            headers["Content-Type"] = "application/json"
            with contextlib.suppress(ConnectionResetError):
                await call.respond(status, headers, orjson.dumps(body))
    finally:
        path = call.path
        close_exchange(app[METRICS], ex, method=call.method, path=path, route=path, status=status)


def open_exchange() -> Exchange:
    """A request's Exchange, its id bound to every log line written while it runs."""
    ex = Exchange(
        request_id=new_request_id(time.time_ns() // 1_000_000), started_s=time.perf_counter()
    )
    structlog.contextvars.bind_contextvars(request_id=ex.request_id)
    return ex


def failure(
    ex: Exchange, exc: Exception, method: str, path: str
) -> tuple[int, dict, dict[str, str]]:
    """The Anthropic-shaped answer to a request that raised (status, body, headers); called in
    the `except` block, so that an unexpected error is logged with its traceback."""
    headers = {"request-id": ex.request_id}
    if isinstance(exc, Refusal):
        ex.outcome = exc.outcome
        if exc.status < 500:  # the proxy's own 4xx: retrying the same request cannot help, and
            headers["x-should-retry"] = "false"  # Claude Code retries a 401 for 3 min
        return exc.status, exc.body(), {**headers, **exc.headers}
    if isinstance(exc, StoreUnavailable):
        ex.outcome = "store_unavailable"
        log.warning("store_unavailable", reason=str(exc))
        body = error_body(
            "api_error",
            "The proxy cannot reach its usage store right now, so it cannot meter this "
            "request; nothing was charged. Try again in a moment.",
        )
        return 503, body, headers
    if isinstance(exc, web.HTTPException):
        ex.outcome = "rejected"
        error_type = HTTP_ERROR_TYPES.get(exc.status, "api_error")
        body = error_body(error_type, _http_message(exc, method, path))
        return exc.status, body, headers
    ex.outcome = "proxy_error"
    log.exception("unhandled_error")
    return 500, error_body("api_error", "The proxy failed to handle this request."), headers


def close_exchange(
    metrics: Metrics, ex: Exchange, *, method: str, path: str, route: str, status: int
) -> None:
    """The request's one log line and its metrics, once it has been answered."""
    duration_ms = (time.perf_counter() - ex.started_s) * 1000
    log.info(
        "request",
        duration_ms=round(duration_ms, 2),
        **request_line(ex, method=method, path=path, status=status),
    )
    metrics.observe(ex, route=route, status=status, duration_s=duration_ms / 1000)
    structlog.contextvars.unbind_contextvars("request_id")


def _http_message(exc: web.HTTPException, method: str, path: str) -> str:
    if exc.status == 413:
        return "The request body is larger than this proxy accepts (server.max_body_mb)."
    if exc.status == 404:
        return f"No route for {method} {path} on this proxy."
    if exc.status == 405:
        return f"Method {method} is not allowed for {path}."
    return exc.reason


def _route(request: web.Request) -> str:
    """The matched route's pattern (`/continue/{token}`): bounded, and never a secret."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _loggable(request: web.Request) -> str:
    """The path for the log, without secrets: a continue link's token is a credential."""
    if request.path.startswith("/continue/"):
        return "/continue/{token}"
    return request.path
