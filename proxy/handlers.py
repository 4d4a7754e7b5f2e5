"""The /v1 routes: /v1/messages is metered; every other /v1 path is relayed as it is."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import hdrs, web
from multidict import CIMultiDict

from proxy.appkeys import (
    BILLING,
    CLOCK,
    EXCHANGE,
    KEYS,
    METRICS,
    SETTINGS,
    TASKS,
    TOKENS,
    UPSTREAM,
)
from proxy.auth import key_from_headers
from proxy.errors import Refusal, bad_request, unauthenticated
from proxy.exchange import Exchange
from proxy.front import chunk_frame
from proxy.http1 import Response, Sink, UpstreamError
from proxy.ledger import (
    BALANCE,
    MEMBER_MONTHLY,
    ORG_MONTHLY,
    SESSION,
    TIER_MONTHLY,
    WEEKLY,
    Account,
    Windows,
)
from proxy.metering import SseMeter, Usage, load_json, usage_from_body
from proxy.money import format_usd
from proxy.paths import check_relayable
from proxy.refusals import extra_usage_disabled_refusal, reset_phrase, rfc3339
from proxy.store.base import Seat
from proxy.upstream import Upstream

SSE_CONTENT_TYPE = "text/event-stream"
CONTINUE_HEADER = "x-extra-usage"
# When more text than this needs counting anew (~5 ms of tiktoken per 100 KB), the input
# estimate runs in a worker thread; texts counted before cost a lookup (tokens.py).
THREAD_ESTIMATE_CHARS = 64 * 1024
# Above any model's output limit, and small enough that a worst case stays a 64-bit integer.
MAX_TOKENS_MAX = 10_000_000


async def head_root(request: web.Request) -> web.Response:
    """Claude Code pre-connects with `HEAD /` at start-up: answer at once."""
    return web.Response(status=200)


async def authenticate(request: web.Request) -> Seat:
    return await seat_for(request.app, request[EXCHANGE], request.headers)


async def seat_for(app: web.Application, ex: Exchange, headers: Mapping[str, str]) -> Seat:
    """The seat of the key the request carries, into the Exchange; else a 401 Refusal."""
    key = key_from_headers(headers)
    if not key:
        raise unauthenticated(
            "No key was sent. Set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) to the key your "
            "usage-proxy owner gave you."
        )
    seat = await app[KEYS].seat(key)
    if seat is None:
        raise unauthenticated("This key is not valid on this proxy (unknown or revoked).")
    ex.seat = seat
    return seat


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any /v1 path but /v1/messages (count_tokens, models, ...): authenticated, never metered."""
    await authenticate(request)
    check_relayable(request.rel_url.raw_path)
    ex = request[EXCHANGE]
    upstream = request.app[UPSTREAM]
    body = await request.read()
    ex.forwarded_s = started_s = time.perf_counter()
    async with upstream.send(
        request.method, request.rel_url.raw_path_qs, upstream.request_headers(request.headers), body
    ) as up:
        ex.upstream_status = up.status
        ex.upstream_ms = (time.perf_counter() - started_s) * 1000
        response = web.StreamResponse(
            status=up.status, headers=upstream.response_headers(up.headers)
        )
        await response.prepare(request)
        try:
            async for chunk in up.chunks():
                await response.write(chunk)
        except ConnectionResetError:
            ex.outcome = "client_disconnected"
            return response
        except UpstreamError:
            ex.outcome = "upstream_cut"
            _abort(request)
            return response
        await response.write_eof()
        return response


class Call(Protocol):
    """One POST /v1/messages as the handler sees it, whichever server took it: the lean
    front (front.py), or aiohttp on a connection that asked for another route first (`AioCall`).
    Writes raise ConnectionResetError when the client has gone."""

    headers: Mapping[str, str]
    path_qs: str  # the path and query, as sent
    heads_from_callbacks: bool  # `begin_stream` works (the lean front); else `start_stream`

    async def read(self) -> bytes:
        """The whole body; a 413 (aiohttp's HTTPRequestEntityTooLarge) past server.max_body_mb."""
        ...

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """A whole answer."""
        ...

    async def start_stream(self, status: int, headers: Mapping[str, str], first: bytes) -> None:
        """A streamed answer's head and its first chunk, in one write."""
        ...

    def begin_stream(self, status: int, headers: Mapping[str, str], first: bytes) -> bool:
        """`start_stream` from a callback (no await), where `heads_from_callbacks`; False as
        for `send`."""
        ...

    def send(self, chunk: bytes) -> bool:
        """One more chunk of the stream, written at once (from a callback: no await); False when
        the client left or its send buffer is full (then `client_left`, or `drain`)."""
        ...

    @property
    def client_left(self) -> bool: ...

    async def drain(self) -> None:
        """Wait until the client's send buffer has room again."""
        ...

    async def end_stream(self) -> None: ...

    def abort(self) -> None:
        """Close the connection at once: the client sees a broken answer."""
        ...


async def messages_route(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages on a connection aiohttp serves (front.py hands it one)."""
    call = AioCall(request)
    await messages(request.app, request[EXCHANGE], call)
    assert call.response is not None  # every path through messages() answers or raises
    return call.response


async def messages(app: web.Application, ex: Exchange, call: Call) -> None:
    """POST /v1/messages: authenticate, price the worst case, reserve, forward, meter, settle."""
    await seat_for(app, ex, call.headers)
    body = await call.read()
    await read_call(app, ex, body)
    await app[BILLING].admit(ex, continue_requested=wants_to_continue(call.headers))

    upstream = app[UPSTREAM]
    headers = upstream.request_headers(call.headers)
    if ex.stream:
        try:
            await _relay_stream(app, ex, call, headers, body)
            return
        finally:
            _spawn_settle(app, ex)
    # Not streaming: the upstream call runs to its end even when the client leaves, so the
    # charge is always the API's own count of what it produced.
    task = app[TASKS].spawn(
        _forward_whole(app, ex, call.path_qs, headers, body), name=f"forward {ex.request_id}"
    )
    try:
        status, response_headers, payload = await asyncio.shield(task)
        try:
            await call.respond(status, response_headers, payload)  # out before its settlement
        except ConnectionResetError:
            ex.outcome = "client_disconnected"
    except asyncio.CancelledError:
        if not task.done():
            ex.outcome = "client_disconnected"
        raise
    finally:  # once the forward has ended, whatever became of the client
        if task.done():
            _spawn_settle(app, ex)
        else:  # the client left first: counted and settled when the forward ends
            task.add_done_callback(lambda _: _charged_late(app, ex))


async def read_call(app: web.Application, ex: Exchange, body: bytes) -> None:
    """What pricing needs, into the Exchange: model, max_tokens, stream, the input estimate.
    The parsed body dies here: a stream that held it would hold the whole prompt as Python
    objects for as long as it runs (several times its size in bytes)."""
    call = parse_messages_call(body)
    ex.model, ex.max_tokens, ex.stream = call["model"], call["max_tokens"], call["stream"]
    ex.price = app[SETTINGS].prices.lookup(ex.model)
    if ex.price is None:
        raise bad_request(  # operators: add it to pricing.toml or set pricing.unknown_model
            f"model: {ex.model!r} is not available through this proxy (it has no price here, so "
            "it cannot be metered). Use another model, or ask the proxy's operator to add it."
        )
    try:
        estimate = app[TOKENS].known_input_tokens(call, encode_chars_max=THREAD_ESTIMATE_CHARS)
        if estimate is None:  # a large new prompt must not stall every other request
            estimate = await asyncio.to_thread(app[TOKENS].request_input_tokens, call)
    except RecursionError:
        raise bad_request("messages: nested too deeply to be read.") from None
    ex.input_tokens_estimate = estimate


def _spawn_settle(app: web.Application, ex: Exchange) -> None:
    app[TASKS].spawn(app[BILLING].settle(ex), name=f"settle {ex.request_id}")


def _charged_late(app: web.Application, ex: Exchange) -> None:
    app[METRICS].observe_charge(ex)  # the request's log line and metrics went before its cost
    _spawn_settle(app, ex)


def wants_to_continue(headers: Mapping[str, str]) -> bool:
    """`x-extra-usage: continue`: the member chooses to go on with extra usage when needed."""
    return headers.get(CONTINUE_HEADER, "").strip().lower() == "continue"


async def continue_extra_usage(request: web.Request) -> web.Response:
    """POST /v1/extra-usage/continue: opt in to extra usage until the blocking window resets."""
    return web.json_response(await continue_for(request.app, await authenticate(request)))


async def continue_for(app: web.Application, seat: Seat) -> dict[str, Any]:
    """Opt the member in to extra usage until the blocking window resets; the JSON answer."""
    status = await app[BILLING].continue_extra_usage(seat.member_id)
    if not status.member.extra_usage_enabled:
        raise extra_usage_disabled_refusal(seat)
    if status.member.consent == "always":
        return {
            "status": "active",
            "consent": "always",
            "consent_until": None,
            "message": 'Extra usage is always on for you (consent "always"): requests beyond '
            "your included quota are billed at API rates.",
        }
    assert status.member.consent_until_s is not None
    return {
        "status": "active",
        "consent": "ask",
        "consent_until": rfc3339(status.member.consent_until_s),
        "message": "Extra usage is on for you until "
        f"{reset_phrase(status.member.consent_until_s, seat.timezone)}; requests beyond your "
        "included quota are billed at API rates.",
    }


async def member_usage(request: web.Request) -> web.Response:
    """GET /v1/usage: the member's own windows, extra usage state and month-to-date spend."""
    return web.json_response(await usage_of(request.app, await authenticate(request)))


async def usage_of(app: web.Application, seat: Seat) -> dict[str, Any]:
    """A member's own windows, extra usage state and month-to-date spend: GET /v1/usage's body."""
    now_s = app[CLOCK].now_s()
    status = await app[BILLING].status(seat.member_id)
    member, funds = status.member, status.funds
    if not member.extra_usage_enabled:
        extra_status = "off"
    else:
        extra_status = "active" if member.has_continued(now_s) else "available"
    limit = funds.account(MEMBER_MONTHLY, TIER_MONTHLY)
    org = funds.account(ORG_MONTHLY)
    balance = funds.account(BALANCE)
    return {
        "member": {
            "email": seat.email,
            "org": seat.org_id,
            "tier": seat.tier,
            "role": seat.role,
        },
        "session": _window_view(status.windows, SESSION),
        "weekly": _window_view(status.windows, WEEKLY),
        "extra_usage": {
            "status": extra_status,
            "consent": member.consent,
            "consent_until": rfc3339(member.consent_until_s)
            if member.consent_until_s is not None and member.consent_until_s > now_s
            else None,
            "month": funds.month,
            "month_spent_usd": format_usd(funds.member_spent_nanos),
            "member_limit_usd": _limit_view(limit),
            "org_month_spent_usd": format_usd(org.used_nanos if org else 0),
            "org_limit_usd": _limit_view(org),
            "balance_usd": format_usd(balance.limit_nanos or 0) if balance else None,
        },
    }


def _window_view(windows: Windows, kind: str) -> dict[str, Any] | None:
    window = windows.get(kind)
    if window is None:
        return None
    return {
        "limit_usd": format_usd(window.limit_nanos),
        "used_usd": format_usd(window.used_nanos),
        "remaining_usd": format_usd(window.remaining_nanos),
        # a window opens with the first request: none is open yet
        "resets_at": None if kind in windows.opened else rfc3339(window.ends_at_s),
    }


def _limit_view(account: Account | None) -> str:
    if account is None or account.limit_nanos is None:
        return "unlimited"
    return format_usd(account.limit_nanos)


def parse_messages_call(body: bytes) -> dict[str, Any]:
    """Read what pricing needs (model, max_tokens, stream, the text); forward nothing re-encoded."""
    try:
        call = load_json(body, reread=_max_tokens_is_float)
    except (ValueError, RecursionError):  # decode errors are ValueErrors; nesting
        raise bad_request("The request body is not valid JSON (or is nested too deeply).") from None
    if not isinstance(call, dict):
        raise bad_request("The request body must be a JSON object.")
    if not isinstance(call.get("model"), str) or not call["model"]:
        raise bad_request("model: Field required (a model name such as claude-opus-4-8).")
    max_tokens = call.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad_request("max_tokens: Field required (a positive integer).")
    if max_tokens > MAX_TOKENS_MAX:
        raise bad_request(f"max_tokens: must be at most {MAX_TOKENS_MAX}.")
    call["stream"] = call.get("stream") is True
    return call


def _max_tokens_is_float(call: Any) -> bool:
    """orjson reads an integer past 64 bits as a float; the stdlib, as the int it is."""
    return type(call) is dict and type(call.get("max_tokens")) is float


async def _forward_whole(
    app: web.Application, ex: Exchange, path_qs: str, headers: CIMultiDict[str], body: bytes
) -> tuple[int, CIMultiDict[str], bytes]:
    """Forward, read the whole answer and charge it; runs apart from the client (its caller
    settles once it has ended)."""
    upstream = app[UPSTREAM]
    try:
        ex.forwarded_s = started_s = time.perf_counter()
        async with upstream.send("POST", path_qs, headers, body) as up:
            ex.upstream_status = up.status
            try:
                payload = await up.read()
            except UpstreamError:
                raise Refusal(
                    502,
                    "api_error",
                    "The upstream API broke off its answer.",
                    outcome="upstream_cut",
                ) from None
            ex.upstream_ms = (time.perf_counter() - started_s) * 1000
            response_headers = upstream.response_headers(up.headers)
        usage = usage_from_body(payload) if up.status < 300 else None
        app[BILLING].charge(ex, usage)
        if ex.outcome == "unknown":
            ex.outcome = "ok" if up.status < 300 else "upstream_error"
        response_headers.update(ex.usage_headers)
        response_headers["x-usage-cost"] = format_usd(ex.cost_nanos)
        return up.status, response_headers, payload
    except Refusal as refusal:
        ex.outcome = refusal.outcome
        raise


async def _relay_stream(
    app: web.Application, ex: Exchange, call: Call, headers: CIMultiDict[str], body: bytes
) -> None:
    """Relay an SSE stream chunk by chunk while metering it; charge what was used."""
    upstream = app[UPSTREAM]
    ex.forwarded_s = started_s = time.perf_counter()
    relay = _Relay(call, ex, upstream, started_s)
    try:
        async with upstream.send("POST", call.path_qs, headers, body, relay.on_head) as up:
            if not relay.event_stream:
                payload = await up.read()
                app[BILLING].charge(ex, usage_from_body(payload) if up.status < 300 else None)
                ex.outcome = "ok" if up.status < 300 else "upstream_error"
                try:
                    await call.respond(up.status, relay.headers, payload)
                except ConnectionResetError:
                    ex.outcome = "client_disconnected"
                return
            app[METRICS].open_streams.inc()
            try:
                ex.outcome = await _pump(call, up, relay)
            finally:
                app[METRICS].open_streams.dec()
            if ex.outcome == "upstream_cut":
                call.abort()  # let the client see a broken stream, as it was
            elif ex.outcome != "client_disconnected":
                with contextlib.suppress(ConnectionResetError):
                    await call.end_stream()
    except Refusal as refusal:
        ex.outcome = refusal.outcome
        raise
    except asyncio.CancelledError:  # the client left (its stream may have begun, from the
        if ex.outcome == "unknown":  # upstream's callbacks, before this task ran again)
            ex.outcome = "client_disconnected"
        raise
    finally:
        if relay.meter.saw_message_start:  # else nothing billable (usage None, cost 0)
            app[BILLING].charge(ex, _stream_usage(app, relay.meter))


class _Relay:
    """A stream on its way to the client, driven by the upstream connection's callbacks: its
    head (`on_head`), then each chunk (`sink`, for `Response.push`), metered and written on as
    it arrives, with no task switch between reading a chunk and writing it. On the lean front
    the answer's head goes out with the first chunk from that callback too: a first byte does
    not wait for the handler's task to be woken in a busy loop (docs/performance.md). aiohttp's
    response writes its head from the task (`_pump`)."""

    __slots__ = (
        "_call",
        "_ex",
        "_started_s",
        "_upstream",
        "begun",
        "event_stream",
        "headers",
        "meter",
        "status",
    )

    def __init__(self, call: Call, ex: Exchange, upstream: Upstream, started_s: float) -> None:
        self._call = call
        self._ex = ex
        self._upstream = upstream
        self._started_s = started_s
        self.meter = SseMeter()
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.event_stream = False  # a 2xx answer of SSE events, to relay chunk by chunk
        self.begun = False  # the answer's head is written

    def on_head(self, up: Response) -> Sink | None:
        """The upstream's head has arrived (from its connection's callback): the answer's
        status and headers; `sink` for an event stream's body, where the call can begin the
        answer from a callback."""
        ex = self._ex
        ex.upstream_status = self.status = up.status
        ex.upstream_ms = (time.perf_counter() - self._started_s) * 1000
        self.headers = self._upstream.response_headers(up.headers)
        self.headers.update(ex.usage_headers)
        self.event_stream = up.status < 300 and up.content_type == SSE_CONTENT_TYPE
        return self.sink if self.event_stream and self._call.heads_from_callbacks else None

    def sink(self, chunk: bytes) -> bool:
        self.meter.feed(chunk)
        if self.begun:
            return self._call.send(chunk)
        self.begun = True
        return self._call.begin_stream(self.status, self.headers, chunk)


async def _pump(call: Call, up: Response, relay: _Relay) -> str:
    """Copy upstream chunks to the client as they arrive (`_Relay`); how the stream ended."""
    try:
        if not call.heads_from_callbacks:  # the head and first chunk, from here
            first = await up.next_chunk()
            relay.meter.feed(first)
            relay.begun = True
            await call.start_stream(up.status, relay.headers, first)
        while not await up.push(relay.sink):
            if call.client_left:
                return "client_disconnected"
            await call.drain()  # the client reads slowly: wait for it
        if not relay.begun:  # the body was empty: the head alone
            await call.start_stream(up.status, relay.headers, b"")
    except UpstreamError:
        return "upstream_cut"
    except ConnectionResetError:
        return "client_disconnected"
    if relay.meter.completed:
        return "ok"
    return "upstream_error_event" if relay.meter.error_type else "upstream_cut"


class AioCall:
    """`Call` over aiohttp's request and response objects."""

    heads_from_callbacks = False  # a response's head is written by `prepare`, awaited

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.headers = request.headers
        self.path_qs = request.rel_url.raw_path_qs
        self.response: web.StreamResponse | None = None
        self._chunked = False
        self._high_water_bytes = 0
        self.client_left = False

    async def read(self) -> bytes:
        return await self._request.read()

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.response = web.Response(status=status, headers=headers, body=body)
        await self.response.prepare(self._request)
        await self.response.write_eof()

    async def start_stream(self, status: int, headers: Mapping[str, str], first: bytes) -> None:
        response = self.response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(self._request)  # aiohttp sends the head with the first write
        self._chunked = response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"
        transport = self._request.transport
        assert transport is not None
        self._high_water_bytes = transport.get_write_buffer_limits()[1]
        if first:
            await response.write(first)

    def begin_stream(self, status: int, headers: Mapping[str, str], first: bytes) -> bool:
        raise NotImplementedError("aiohttp writes a response's head from a task: start_stream")

    def send(self, chunk: bytes) -> bool:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self.client_left = True
            return False
        transport.write(chunk_frame(chunk) if self._chunked else chunk)
        return transport.get_write_buffer_size() <= self._high_water_bytes

    async def drain(self) -> None:
        await self._request.writer.drain()

    async def end_stream(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        _abort(self._request)


def _stream_usage(app: web.Application, meter: SseMeter) -> Usage | None:
    """What a stream used: the API's count when it finished, else an estimate of the output."""
    if not meter.saw_message_start:
        return None  # upstream produced nothing billable
    if meter.completed:
        return meter.usage
    estimate = app[TOKENS].count(meter.relayed_text())
    return dataclasses.replace(
        meter.usage,
        output_tokens=max(meter.usage.output_tokens, estimate),
        output_estimated=True,
    )


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()
