"""Per-request frame: an id and log context, Anthropic-shaped errors, the canonical log line."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from proxy.appkeys import EXCHANGE, METRICS
from proxy.errors import Refusal, error_body
from proxy.exchange import Exchange, new_request_id
from proxy.logs import request_line
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
    ex = Exchange(
        request_id=new_request_id(time.time_ns() // 1_000_000), started_s=time.perf_counter()
    )
    request[EXCHANGE] = ex
    structlog.contextvars.bind_contextvars(request_id=ex.request_id)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if ex.outcome == "unknown":
            ex.outcome = "ok" if status < 400 else "error"
        return response
    except Refusal as refusal:
        ex.outcome = refusal.outcome
        status = refusal.status
        headers = refusal.headers
        if status < 500:  # the proxy's own 4xx: retrying the same request cannot help, and
            headers = {"x-should-retry": "false", **headers}  # Claude Code retries a 401 for 3 min
        return _error_response(ex, refusal.status, refusal.body(), headers)
    except StoreUnavailable as exc:
        ex.outcome = "store_unavailable"
        status = 503
        log.warning("store_unavailable", reason=str(exc))
        body = error_body(
            "api_error",
            "The proxy cannot reach its usage store right now, so it cannot meter this "
            "request; nothing was charged. Try again in a moment.",
        )
        return _error_response(ex, 503, body, {})
    except web.HTTPException as exc:
        ex.outcome = "rejected"
        status = exc.status
        error_type = HTTP_ERROR_TYPES.get(exc.status, "api_error")
        message = _http_message(exc, request)
        return _error_response(ex, exc.status, error_body(error_type, message), {})
    except Exception:
        ex.outcome = "proxy_error"
        log.exception("unhandled_error")
        body = error_body("api_error", "The proxy failed to handle this request.")
        return _error_response(ex, 500, body, {})
    finally:
        duration_ms = (time.perf_counter() - ex.started_s) * 1000
        log.info(
            "request",
            duration_ms=round(duration_ms, 2),
            **request_line(ex, method=request.method, path=_loggable(request), status=status),
        )
        request.app[METRICS].observe(
            ex, route=_route(request), status=status, duration_s=duration_ms / 1000
        )
        structlog.contextvars.unbind_contextvars("request_id")


def _error_response(ex: Exchange, status: int, body: dict, headers: dict[str, str]) -> web.Response:
    response = web.json_response(body, status=status, headers=headers)
    response.headers["request-id"] = ex.request_id
    return response


def _http_message(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 413:
        return "The request body is larger than this proxy accepts (server.max_body_mb)."
    if exc.status == 404:
        return f"No route for {request.method} {request.path} on this proxy."
    if exc.status == 405:
        return f"Method {request.method} is not allowed for {request.path}."
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
