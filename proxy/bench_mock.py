"""The mock upstream on a lean server, for `usage-proxy bench`.

The bench measures what the proxy adds, so the mock must never be the limit. On two cores it
shares one with the load generator, and the aiohttp mock (mock_upstream.py) took 1.5 to 1.8 ms of
CPU a stream: in the streaming run that core was 98% busy before the proxy was even in the path,
and a stream that starts at once took 2.3 ms to its first byte at the median, 10 to 12 ms at p99.

This server gives the same answers (mock_upstream's `Script`, `reply_to` and `Reply`, so the same
bodies, SSE events, usage and headers) from an asyncio.Protocol on httptools. A stream's events
are written by a timer (`call_later`, `x-mock-delay-ms` apart), not by a task that sleeps. It
serves what the bench sends and nothing more: POST /v1/messages, one request at a time on a
keep-alive connection, no faults (`x-mock-fail` gets a 400), no recording.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping

import httptools

from proxy.errors import error_body
from proxy.front import REASONS, chunk_frame
from proxy.mock_upstream import (
    RATELIMIT_HEADERS,
    SSE_HEADERS,
    MockRequestInvalid,
    Script,
    dumps,
    json_object,
    new_request_id,
    reply_to,
)

_FIXED_HEADERS = "".join(f"{name}: {value}\r\n" for name, value in RATELIMIT_HEADERS.items())
_SSE_HEAD = "".join(f"{name}: {value}\r\n" for name, value in SSE_HEADERS.items())


class BenchMock(asyncio.Protocol):
    """One connection to the mock: one request read, answered (or streamed), then the next."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._events: Iterator[bytes] | None = None  # the rest of the stream being written
        self._delay_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._keep_alive = True

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._keep_alive = False
            self._error(400, "invalid_request_error", "the request is not valid HTTP/1.1")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._events = None
        self._transport = None

    # -- httptools callbacks

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url, headers, body = self._url, self._headers, b"".join(self._body)
        self._url, self._headers, self._body = b"", {}, []
        self._keep_alive = self._parser.should_keep_alive()
        self._answer(self._parser.get_method(), url, headers, body)

    # -- answers

    def _answer(self, method: bytes, url: bytes, headers: Mapping[str, str], body: bytes) -> None:
        if method != b"POST" or url.partition(b"?")[0] != b"/v1/messages":
            self._error(404, "not_found_error", "the bench's mock serves POST /v1/messages only")
            return
        if headers.get("x-api-key") != self._api_key:
            self._error(401, "authentication_error", "invalid x-api-key")
            return
        try:
            script = Script.from_headers(headers, fast=False)
            if script.fail is not None:
                raise MockRequestInvalid("x-mock-fail: the bench's mock serves no faults")
            reply = reply_to(json_object(body), script)
        except MockRequestInvalid as invalid:
            self._error(400, "invalid_request_error", str(invalid))
            return
        if not reply.stream:
            self._write_whole(200, dumps(reply.message()), new_request_id())
            return
        events = reply.sse_events()
        self._events = iter((*events.opening[1:], *events.deltas, *events.closing))
        self._delay_s = script.delay_ms / 1000
        head = _head(200, _SSE_HEAD + "transfer-encoding: chunked\r\n", new_request_id())
        self._write(head + chunk_frame(events.opening[0]))
        assert self._transport is not None
        self._transport.pause_reading()  # the next request, once this answer is whole
        self._timer = self._loop.call_later(self._delay_s, self._next_event)

    def _next_event(self) -> None:
        self._timer = None
        assert self._events is not None
        event = next(self._events, None)
        if event is None:
            self._events = None
            self._write(b"0\r\n\r\n")
            self._end()
            return
        self._write(chunk_frame(event))
        self._timer = self._loop.call_later(self._delay_s, self._next_event)

    def _error(self, status: int, error_type: str, message: str) -> None:
        body = error_body(error_type, message)
        body["request_id"] = request_id = new_request_id()  # as the header says
        self._write_whole(status, dumps(body), request_id)

    def _write_whole(self, status: int, body: bytes, request_id: str) -> None:
        length = f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self._write(_head(status, length, request_id) + body)
        self._end()

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _end(self) -> None:
        if self._transport is None:
            return
        if self._keep_alive:
            self._transport.resume_reading()
        else:
            self._transport.close()


def _head(status: int, headers: str, request_id: str) -> bytes:
    return (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nrequest-id: {request_id}\r\n"
        f"{_FIXED_HEADERS}{headers}\r\n"
    ).encode("latin-1")
