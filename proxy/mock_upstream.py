"""The fake Messages API (SPEC §9): realistic shapes, deterministic usage, scriptable faults.

Usage and faults are scripted per request with `x-mock-*` headers (see `Script`). Every response
carries a `request-id` and a few `anthropic-ratelimit-*` headers, like the real API's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiohttp import web

from proxy.errors import error_body

# (id, display name, created_at), newest first, as GET /v1/models lists them.
MODELS = (
    ("claude-opus-4-8", "Claude Opus 4.8", "2026-05-14T00:00:00Z"),
    ("claude-opus-4-7", "Claude Opus 4.7", "2026-03-18T00:00:00Z"),
    ("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05T00:00:00Z"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z"),
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z"),
    ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z"),
    ("claude-3-haiku-20240307", "Claude Haiku 3", "2024-03-07T00:00:00Z"),
)
# Words of the generated answer; each is one token for tiktoken's encodings, so an output
# estimate from relayed text comes close to the scripted output_tokens.
WORDS = (" The", " mock", " upstream", " says", " hello", " and", " counts", " every", " word")
OUTPUT_TOKENS_DEFAULT = 12
DELTAS_DEFAULT = 5
FAILS = frozenset(
    {"529", "500", "cut-stream", "error-event", "stall", "reset", "hang", "malformed-sse"}
)
# What `x-mock-fail: malformed-sse` writes mid-stream before going on as if nothing happened:
# an event whose data is not JSON, bytes that are not UTF-8, a line with no field name, an
# unknown event, a comment, and a message_delta whose output count is not a number.
MALFORMED_SSE = (
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "index\n\n'
    b"event: content_block_delta\ndata: \xff\xfe\xfd not utf-8\n\n"
    b"this line has no field name\n\n"
    b'event: surprise\ndata: {"type": "surprise"}\n\n'
    b": a comment line\n\n"
    b'data: {"type": "message_delta", "usage": {"output_tokens": "many"}}\n\n'
)
RATELIMIT_HEADERS = {
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
    "anthropic-ratelimit-input-tokens-limit": "2000000",
    "anthropic-ratelimit-input-tokens-remaining": "2000000",
    "anthropic-ratelimit-output-tokens-limit": "400000",
    "anthropic-ratelimit-output-tokens-remaining": "400000",
}
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
CLIENT_GONE_POLL_S = 0.05
_ID_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# random bytes -> id characters in one translate (a quarter of the mock's CPU went to ids made
# one secrets.choice at a time); the slight bias towards the first letters does not matter here
_ID_TABLE = bytes(ord(_ID_ALPHABET[b % len(_ID_ALPHABET)]) for b in range(256))


@dataclass(frozen=True, slots=True)
class MockConfig:
    """How one mock app behaves."""

    api_key: str | None = None  # when set, any other key (x-api-key or Bearer) gets 401
    fast: bool = False  # no artificial delays at all (x-mock-delay-ms is ignored)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as the mock received it."""

    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class MockState:
    """What one mock app has seen; tests read it through `MOCK_STATE_KEY`."""

    requests_total: int = 0
    messages_total: int = 0  # POST /v1/messages that passed the key check
    streams_completed: int = 0  # streams that reached message_stop
    clients_gone: int = 0  # answers whose client went away before the mock was done
    stream_bytes_sent: int = 0  # bytes of SSE that streams handed to their connections
    recent: deque[RecordedRequest] = field(default_factory=lambda: deque(maxlen=32))


MOCK_CONFIG_KEY = web.AppKey("mock_config", MockConfig)
MOCK_STATE_KEY = web.AppKey("mock_state", MockState)
REQUEST_ID_KEY = web.RequestKey("mock_request_id", str)


class MockRequestInvalid(Exception):
    """A request the mock answers with 400 invalid_request_error."""


@dataclass(frozen=True, slots=True)
class Script:
    """Usage and faults scripted by a request's `x-mock-*` headers."""

    input_tokens: int | None = None  # x-mock-input-tokens; default: the request's text count
    output_tokens: int | None = None  # x-mock-output-tokens; default: min(max_tokens, 12)
    cache_read_tokens: int = 0  # x-mock-cache-read-tokens
    cache_write_5m_tokens: int = 0  # x-mock-cache-write-tokens
    cache_write_1h_tokens: int = 0  # x-mock-cache-write-1h-tokens
    web_searches: int | None = None  # x-mock-web-searches
    speed: str | None = None  # x-mock-speed: fast | standard
    deltas: int = DELTAS_DEFAULT  # x-mock-deltas: text deltas of a stream
    delay_ms: int = 0  # x-mock-delay-ms: before each stream event after message_start
    fail: str | None = None  # x-mock-fail: one of FAILS
    retry_after: str | None = None  # x-mock-retry-after: the retry-after of a 529 or 500

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], *, fast: bool) -> Script:
        """Read the `x-mock-*` headers; raises MockRequestInvalid on a malformed one."""
        speed = headers.get("x-mock-speed")
        if speed is not None and speed not in ("fast", "standard"):
            raise MockRequestInvalid("x-mock-speed: expected fast or standard")
        fail = headers.get("x-mock-fail")
        if fail is not None and fail not in FAILS:
            raise MockRequestInvalid(f"x-mock-fail: expected one of {'|'.join(sorted(FAILS))}")
        delay_ms = _header_count(headers, "x-mock-delay-ms")
        deltas = _header_count(headers, "x-mock-deltas")
        return cls(
            input_tokens=_header_count(headers, "x-mock-input-tokens"),
            output_tokens=_header_count(headers, "x-mock-output-tokens"),
            cache_read_tokens=_header_count(headers, "x-mock-cache-read-tokens") or 0,
            cache_write_5m_tokens=_header_count(headers, "x-mock-cache-write-tokens") or 0,
            cache_write_1h_tokens=_header_count(headers, "x-mock-cache-write-1h-tokens") or 0,
            web_searches=_header_count(headers, "x-mock-web-searches"),
            speed=speed,
            deltas=DELTAS_DEFAULT if deltas is None else deltas,
            delay_ms=0 if fast else delay_ms or 0,
            fail=fail,
            retry_after=headers.get("x-mock-retry-after"),
        )


def _header_count(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise MockRequestInvalid(f"{name}: expected a non-negative integer, got {value!r}")
    return count


class SseEvents(NamedTuple):
    """A streamed answer's events: message_start, content_block_start and ping; one
    content_block_delta per text part; content_block_stop, message_delta and message_stop."""

    opening: tuple[bytes, ...]
    deltas: tuple[bytes, ...]
    closing: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer to POST /v1/messages, before it is shaped as JSON or as a stream."""

    message_id: str
    model: str
    stream: bool
    text_parts: list[str]  # the answer's text, one part per stream delta
    stop_reason: str
    input_tokens: int
    output_tokens: int
    script: Script

    def usage(self, *, output_tokens: int, breakdown: bool = True) -> dict[str, Any]:
        """The `usage` object; `breakdown=False` is message_delta's shape (no cache_creation)."""
        script = self.script
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": script.cache_write_5m_tokens
            + script.cache_write_1h_tokens,
            "cache_read_input_tokens": script.cache_read_tokens,
        }
        if breakdown:
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": script.cache_write_5m_tokens,
                "ephemeral_1h_input_tokens": script.cache_write_1h_tokens,
            }
        usage["output_tokens"] = output_tokens
        if script.web_searches is not None:
            usage["server_tool_use"] = {
                "web_search_requests": script.web_searches,
                "web_fetch_requests": 0,
            }
        if breakdown:
            usage["service_tier"] = "standard"
            if script.speed is not None:
                usage["speed"] = script.speed
        return usage

    def sse_events(self) -> SseEvents:
        """The events of a streamed answer, each an SSE event's bytes."""
        start = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self.usage(output_tokens=min(1, self.output_tokens)),
        }
        block = {"type": "text", "text": ""}
        return SseEvents(
            opening=(
                _sse("message_start", {"type": "message_start", "message": start}),
                _sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": block},
                ),
                _sse("ping", {"type": "ping"}),
            ),
            deltas=tuple(
                _sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": text},
                    },
                )
                for text in self.text_parts
            ),
            closing=(
                _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                        "usage": self.usage(output_tokens=self.output_tokens, breakdown=False),
                    },
                ),
                _sse("message_stop", {"type": "message_stop"}),
            ),
        )

    def message(self) -> dict[str, Any]:
        """The non-streaming response body."""
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": "".join(self.text_parts)}],
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": self.usage(output_tokens=self.output_tokens),
        }


def create_mock_app(*, api_key: str | None = None, fast: bool = False) -> web.Application:
    """The fake Messages API; `api_key` makes it refuse other keys, `fast` drops all delays."""
    # the real API takes bodies up to 32 MB (Claude Code's long sessions pass 1 MiB)
    app = web.Application(middlewares=[_mock_middleware], client_max_size=32 * 1024 * 1024)
    app[MOCK_CONFIG_KEY] = MockConfig(api_key=api_key, fast=fast)
    app[MOCK_STATE_KEY] = MockState()
    app.on_response_prepare.append(_add_upstream_headers)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id}", _model)
    app.router.add_route("*", "/v1/{tail:.*}", _echo)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


def run_mock_upstream(host: str, port: int) -> None:
    """Serve the mock until interrupted."""
    web.run_app(create_mock_app(), host=host, port=port)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _mock_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, recording, the key check, and 400s for malformed requests."""
    request[REQUEST_ID_KEY] = new_request_id()
    state = request.app[MOCK_STATE_KEY]
    state.requests_total += 1
    state.recent.append(
        RecordedRequest(
            method=request.method,
            path_qs=request.raw_path,
            headers=_header_dict(request),
            body=await request.read(),
        )
    )
    api_key = request.app[MOCK_CONFIG_KEY].api_key
    if api_key is not None and request.path.startswith("/v1/") and _key(request) != api_key:
        return _error(request, 401, "authentication_error", "invalid x-api-key")
    try:
        return await handler(request)
    except MockRequestInvalid as invalid:
        return _error(request, 400, "invalid_request_error", str(invalid))


def _key(request: web.Request) -> str | None:
    """The key a request carries: `x-api-key`, else `Authorization: Bearer` (newer SDKs)."""
    key = request.headers.get("x-api-key")
    if key is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    return key


async def _add_upstream_headers(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(REQUEST_ID_KEY) or new_request_id()
    response.headers.setdefault("request-id", request_id)
    response.headers.update(RATELIMIT_HEADERS)


async def _messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages, non-streaming or streaming."""
    script = Script.from_headers(request.headers, fast=request.app[MOCK_CONFIG_KEY].fast)
    reply = reply_to(json_object(await request.read()), script)
    request.app[MOCK_STATE_KEY].messages_total += 1
    if script.fail in ("529", "500") or (script.fail == "error-event" and not reply.stream):
        await _delay(script)
        return _failure(request, script.fail, script.retry_after)
    if script.fail == "hang":  # no response head at all, until the client gives up
        await _until_client_gone(request)
        request.app[MOCK_STATE_KEY].clients_gone += 1
        return web.Response(status=504)  # never reaches the client
    try:
        if reply.stream:
            return await _stream(request, reply)
        return await _answer(request, reply)
    except asyncio.CancelledError:  # servers run with handler_cancellation (aiohttp's tests do)
        if _client_gone(request):
            request.app[MOCK_STATE_KEY].clients_gone += 1
        raise


def reply_to(payload: dict[str, Any], script: Script) -> Reply:
    """The answer to a Messages request's JSON object; raises MockRequestInvalid."""
    model = _required_model(payload)
    max_tokens = payload.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise MockRequestInvalid("max_tokens: Field required (an integer of at least 1)")
    stream = payload.get("stream") is True
    # like the real API, never more output than max_tokens
    output_tokens = min(
        max_tokens,
        script.output_tokens if script.output_tokens is not None else OUTPUT_TOKENS_DEFAULT,
    )
    return Reply(
        message_id="msg_01" + _random_id(22),
        model=model,
        stream=stream,
        text_parts=_split_words(output_tokens, script.deltas if stream else 1),
        stop_reason="max_tokens" if output_tokens >= max_tokens else "end_turn",
        input_tokens=(
            script.input_tokens if script.input_tokens is not None else _text_tokens(payload)
        ),
        output_tokens=output_tokens,
        script=script,
    )


async def _answer(request: web.Request, reply: Reply) -> web.StreamResponse:
    """A non-streaming answer, or its fault (cut-stream: half the body, then the cut)."""
    script = reply.script
    await _delay(script)
    if script.fail == "stall":
        await _until_client_gone(request)
        request.app[MOCK_STATE_KEY].clients_gone += 1
        return web.Response(status=504)  # never reaches the client
    if script.fail == "reset":
        _abort(request)
        return web.Response(status=502)  # never reaches the client
    body = dumps(reply.message())
    if script.fail != "cut-stream":
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(headers={"content-type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    _abort(request)
    return response


async def _stream(request: web.Request, reply: Reply) -> web.StreamResponse:
    """The SSE event sequence of a streaming answer, each event written as it is due."""
    state = request.app[MOCK_STATE_KEY]
    script = reply.script
    response = web.StreamResponse(headers=dict(SSE_HEADERS))
    await response.prepare(request)

    async def send(chunk: bytes, *, delayed: bool = True) -> None:
        if delayed:
            await _delay(script)
        await response.write(chunk)
        state.stream_bytes_sent += len(chunk)

    events = reply.sse_events()
    fault_at = (len(events.deltas) + 1) // 2 if script.fail is not None else None
    try:
        await send(events.opening[0], delayed=False)
        for chunk in events.opening[1:]:
            await send(chunk)
        for index, chunk in enumerate(events.deltas):
            if index == fault_at and script.fail == "malformed-sse":
                await response.write(MALFORMED_SSE)
            elif index == fault_at:
                break
            await send(chunk)
        if fault_at is not None and script.fail != "malformed-sse":
            return await _stream_fault(request, response, script)
        for chunk in events.closing:
            await send(chunk)
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError too
        state.clients_gone += 1
        return response
    state.streams_completed += 1
    return response


async def _stream_fault(
    request: web.Request, response: web.StreamResponse, script: Script
) -> web.StreamResponse:
    """End a started stream the way `x-mock-fail` asks."""
    if script.fail == "error-event":
        await _delay(script)
        error = error_body("overloaded_error", "Overloaded")
        await response.write(_sse("error", error))
        await response.write_eof()
    elif script.fail == "cut-stream":  # a clean end of the HTTP body, without message_stop
        response.force_close()
        await response.write_eof()
    elif script.fail == "stall":
        await _until_client_gone(request)
        request.app[MOCK_STATE_KEY].clients_gone += 1
    else:  # reset
        _abort(request)
    return response


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/count_tokens: the same count as a Messages request's input_tokens."""
    script = Script.from_headers(request.headers, fast=request.app[MOCK_CONFIG_KEY].fast)
    payload = json_object(await request.read())
    _required_model(payload)
    if script.fail in ("529", "500"):
        return _failure(request, script.fail, script.retry_after)
    count = script.input_tokens if script.input_tokens is not None else _text_tokens(payload)
    return web.json_response({"input_tokens": count}, dumps=_dumps_str)


async def _models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: one page of the model list (`limit`, `after_id`, `before_id`)."""
    script = Script.from_headers(request.headers, fast=request.app[MOCK_CONFIG_KEY].fast)
    if script.fail in ("529", "500"):
        return _failure(request, script.fail, script.retry_after)
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise MockRequestInvalid("limit: expected an integer from 1 to 1000")
    ids = [model_id for model_id, _, _ in MODELS]
    start, end = 0, len(MODELS)
    if (after_id := request.query.get("after_id")) in ids:
        start = ids.index(after_id) + 1
    if (before_id := request.query.get("before_id")) in ids:
        end = ids.index(before_id)
        start = max(start, end - limit)
    page = [_model_object(model) for model in MODELS[start:end][:limit]]
    return web.json_response(
        {
            "data": page,
            "has_more": start + len(page) < end or (before_id in ids and start > 0),
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        },
        dumps=_dumps_str,
    )


async def _model(request: web.Request) -> web.StreamResponse:
    """GET /v1/models/{model_id}."""
    model_id = request.match_info["model_id"]
    for model in MODELS:
        if model[0] == model_id:
            return web.json_response(_model_object(model), dumps=_dumps_str)
    return _error(request, 404, "not_found_error", f"model: {model_id}")


async def _echo(request: web.Request) -> web.StreamResponse:
    """Any other /v1/ path: what arrived (method, path, query, headers, body), as JSON."""
    url = request.rel_url
    return web.json_response(
        {
            "method": request.method,
            "path": url.raw_path,
            "query_string": url.raw_query_string,
            "headers": _header_dict(request),
            "body_b64": base64.b64encode(await request.read()).decode("ascii"),
        },
        dumps=_dumps_str,
    )


async def _not_found(request: web.Request) -> web.StreamResponse:
    return _error(request, 404, "not_found_error", "Not Found")


def _model_object(model: tuple[str, str, str]) -> dict[str, str]:
    model_id, display_name, created_at = model
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name,
        "created_at": created_at,
    }


def _failure(request: web.Request, fail: str | None, retry_after: str | None) -> web.Response:
    """The HTTP error an `x-mock-fail` status asks for (529 for everything but 500), with
    `retry-after` from `x-mock-retry-after` (a 529 says 1 second unless told otherwise)."""
    if fail == "500":
        headers = {"retry-after": retry_after} if retry_after is not None else None
        return _error(request, 500, "api_error", "Internal server error", headers=headers)
    return _error(
        request,
        529,
        "overloaded_error",
        "Overloaded",
        headers={"retry-after": retry_after or "1", "x-should-retry": "true"},
    )


def _error(
    request: web.Request,
    status: int,
    error_type: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = error_body(error_type, message)
    body["request_id"] = request[REQUEST_ID_KEY]
    return web.Response(
        status=status, body=dumps(body), content_type="application/json", headers=headers
    )


def json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise MockRequestInvalid("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise MockRequestInvalid("the request body must be a JSON object")
    return payload


def _required_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise MockRequestInvalid("model: Field required")
    return model


def _text_tokens(payload: dict[str, Any]) -> int:
    """A deterministic input count: UTF-8 bytes of the strings of system, messages and tools / 4."""
    try:
        size_bytes = sum(_string_bytes(payload.get(key)) for key in ("system", "messages", "tools"))
    except RecursionError:
        raise MockRequestInvalid("messages: nested too deeply") from None
    return max(1, size_bytes // 4)


def _string_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict):
        return sum(_string_bytes(item) for item in value.values())
    if isinstance(value, list):
        return sum(_string_bytes(item) for item in value)
    return 0


def _split_words(word_count: int, part_count: int) -> list[str]:
    """`word_count` one-token words in `part_count` parts as even as can be (no empty part)."""
    words = [WORDS[index % len(WORDS)] for index in range(word_count)]
    part_count = min(part_count, word_count)
    if part_count <= 0:
        return []
    size, extra = divmod(word_count, part_count)
    parts, start = [], 0
    for index in range(part_count):
        end = start + size + (1 if index < extra else 0)
        parts.append("".join(words[start:end]))
        start = end
    return parts


async def _delay(script: Script) -> None:
    if script.delay_ms > 0:
        await asyncio.sleep(script.delay_ms / 1000)


async def _until_client_gone(request: web.Request) -> None:
    """Hang until the client closes the connection (handlers are not cancelled by default).

    aiohttp has no event for a peer that went away, so this polls the transport.
    """
    while not _client_gone(request):  # noqa: ASYNC110
        await asyncio.sleep(CLIENT_GONE_POLL_S)


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _header_dict(request: web.Request) -> dict[str, str]:
    """Request headers by lower-case name; repeated headers joined with ", "."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {_dumps_str(data)}\n\n".encode()


def _dumps_str(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def dumps(value: Any) -> bytes:
    return _dumps_str(value).encode()


def new_request_id() -> str:
    """A `request-id` header's value, shaped like the real API's."""
    return "req_011C" + _random_id(20)


def _random_id(length: int) -> str:
    return secrets.token_bytes(length).translate(_ID_TABLE).decode("ascii")
