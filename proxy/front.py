"""The listening socket's protocol: POST /v1/messages, nearly every request a client of the
proxy sends, on a lean HTTP/1.1 server; every other request on aiohttp's.

Why: aiohttp's server spends about 88 us of CPU on a request on the bench machine (its request
and response objects, router, stream reader and writer), where a protocol that parses with
httptools (llhttp, the parser aiohttp's C extension uses too) and writes each answer in one
buffer spends about 25 (docs/performance.md). The handler is the same either way
(handlers.messages, written against `handlers.Call`); only the objects around it differ.

How a connection is shared:
- The first bytes of each request decide: `POST /v1/messages` (with or without a query) and
  `HEAD /` (Claude Code's pre-connect) are served here; anything else hands the connection, from
  that request's first byte on, to aiohttp's protocol for good, which serves every route,
  /v1/messages included (through `handlers.AioCall`).
- One request at a time. Bytes that arrive while a request is served are kept (reading pauses
  past PIPELINE_MAX_BYTES) and read once it has been answered and its answer has left our
  buffers for the kernel's (`resume_writing`): a client that does not read cannot make us
  hold more than one answer. A request that came in the same
  read as the one before it (a pipelining client's; SDKs and Claude Code never do) is not
  answered: the connection closes after the answer before it, and the client may retry.
- Bodies: at most server.max_body_mb, else 413 (before any reservation) and the connection
  closes; `Expect: 100-continue` is answered.
- Keep-alive as HTTP/1.1 says (HTTP/1.0 and `Connection: close` close after the answer); a
  connection idle for server.idle_timeout_s is closed.
- A client that goes away cancels its request's task, as aiohttp's `handler_cancellation` does.
- Shutdown (`pre_shutdown`, `shutdown`, called by aiohttp's runner): idle connections close at
  once, busy ones after their answer; requests still running after the grace are cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import httptools
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import error_body

LEAN_STARTS = (b"POST /v1/messages ", b"POST /v1/messages?", b"HEAD / ")
SNIFF_BYTES = max(len(start) for start in LEAN_STARTS)
PIPELINE_MAX_BYTES = 64 * 1024
HEAD_MAX_BYTES = 64 * 1024  # the request line and headers (aiohttp's limit: 8 KB a line)
REASONS = {status.value: status.phrase for status in HTTPStatus}
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
# Framing is ours: a handler's own values for these would contradict it.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})

Handle = Callable[["LeanCall"], Awaitable[None]]


class Front:
    """What aiohttp's `Server` is to a site: the protocol factory, and the shutdown of its
    connections (`FrontRunner` puts it in the Server's place)."""

    def __init__(
        self, server: web.Server, handle: Handle, *, max_body_bytes: int, idle_timeout_s: float
    ) -> None:
        self._server = server
        self.handle = handle
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[LeanConnection] = set()
        self.closing = False

    def __call__(self) -> LeanConnection:
        return LeanConnection(self)

    @property
    def aiohttp_connections(self) -> int:
        """Connections handed to aiohttp and still open."""
        return len(self._server.connections)

    def aiohttp_protocol(self) -> asyncio.Protocol:
        return self._server()

    def pre_shutdown(self) -> None:
        self.closing = True
        self._server.pre_shutdown()
        for conn in list(self.connections):
            conn.close_when_answered()

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """aiohttp's runner calls it after pre_shutdown, with its shutdown_timeout."""
        await asyncio.gather(self._server.shutdown(timeout_s), self._shutdown_lean(timeout_s))

    async def _shutdown_lean(self, timeout_s: float | None) -> None:
        running = {conn.task for conn in self.connections if conn.task is not None}
        if running:
            _, late = await asyncio.wait(running, timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for conn in list(self.connections):
            conn.close()


class FrontRunner(web.AppRunner):
    """aiohttp's AppRunner with the lean front as its sites' protocol factory."""

    def __init__(
        self,
        app: web.Application,
        handle: Handle,
        *,
        max_body_bytes: int,
        idle_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._handle = handle
        self._max_body_bytes = max_body_bytes
        self._idle_timeout_s = idle_timeout_s

    async def _make_server(self) -> Front:  # type: ignore[override]
        server = await super()._make_server()
        return Front(
            server,
            self._handle,
            max_body_bytes=self._max_body_bytes,
            idle_timeout_s=self._idle_timeout_s,
        )


class LeanConnection(asyncio.Protocol):
    """One client connection while it is ours (module docstring)."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self._raw = bytearray()  # read, not yet parsed: the start of the next request
        self._in_request = False  # the parser is inside a request
        self._ignoring = False  # the rest of what the parser reads is not answered
        self._close_after = False
        self._reading_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self.writing_paused = False
        self._next_when_drained = False
        self._url = b""
        self._head_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._call: LeanCall | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)
        self._front.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._in_request:
            self._feed(data)
        else:
            self._raw += data
            if self.task is None and not self._next_when_drained:
                self._next()
            elif len(self._raw) > PIPELINE_MAX_BYTES and not self._reading_paused:
                self._pause_reading()
        if self.task is None and self.transport is not None:
            self._arm_idle()  # a request that stops halfway is closed like an idle one

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost cancels what runs

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.transport = None
        if self.task is not None:
            self.task.cancel()  # the client left: its handler learns it as aiohttp's would
        self._wake_drain(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_drain(None)
        if self._next_when_drained:
            self._next_when_drained = False
            self._answered_and_drained()

    # -- httptools' callbacks

    def on_message_begin(self) -> None:
        if self._call is not None:  # a request is being read or answered: this one was
            self._ignoring = self._close_after = True  # pipelined in its read: not answered
            return
        self._in_request = True
        self._url, self._headers, self._body = b"", [], bytearray()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        if not self._ignoring:
            self._url += url
            self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._ignoring:
            self._headers.append((name, value))
            self._count_head(len(name) + len(value))

    def _count_head(self, size_bytes: int) -> None:
        self._head_bytes += size_bytes
        if self._head_bytes > HEAD_MAX_BYTES:
            raise ValueError("request head too large")  # feed_data raises: a 400

    def on_headers_complete(self) -> None:
        if self._ignoring:
            return
        headers = CIMultiDict(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in self._headers
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self._front.max_body_bytes:
            self._refuse_too_large(self._new_call(headers))
            return
        if headers.get("expect", "").lower() == "100-continue":
            self._write(CONTINUE_100)
        self._call = self._new_call(headers)

    def on_body(self, body: bytes) -> None:
        if self._ignoring:
            return
        self._body += body
        if len(self._body) > self._front.max_body_bytes:
            assert self._call is not None
            self._refuse_too_large(self._call)

    def on_message_complete(self) -> None:
        if self._ignoring:
            self._in_request = False
            if self.task is None:  # answered already (a 413): the body has now been read
                self.close()
            return
        self._in_request = False
        assert self._call is not None
        self._call.body = bytes(self._body)
        self._body = bytearray()
        self._start(self._call)

    # -- requests

    def _next(self) -> None:
        """Between requests: read what waits, once the last answer is out."""
        raw = self._raw
        if not raw:
            self._arm_idle()
            return
        if not raw.startswith(LEAN_STARTS):
            if len(raw) < SNIFF_BYTES and any(start.startswith(raw) for start in LEAN_STARTS):
                return  # too few bytes to tell yet
            self._hand_over()
            return
        data = bytes(raw)
        raw.clear()
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._in_request, self._ignoring, self._close_after = False, True, True
            if self.task is None:  # nothing being answered: say what was wrong, and close
                self._write_error(
                    400, "The request could not be read: not valid HTTP/1.1, or a head over 64 KB."
                )

    def _refuse_too_large(self, call: LeanCall) -> None:
        """Answer a body over the limit now (its handler raises the 413 when it reads it); what
        follows is read and dropped until the request ends, then the connection closes."""
        self._ignoring = self._close_after = True
        call.keep_alive = False
        call.too_large_bytes = self._front.max_body_bytes
        self._start(call)

    def _new_call(self, headers: CIMultiDict[str]) -> LeanCall:
        """The request whose head the parser has just read."""
        http11 = self._parser.get_http_version() == "1.1"
        return LeanCall(
            self,
            self._parser.get_method().decode("ascii"),
            self._url.decode("utf-8", "surrogateescape"),
            CIMultiDictProxy(headers),
            keep_alive=self._parser.should_keep_alive() and http11,  # 1.0: one request
            http11=http11,
        )

    def _start(self, call: LeanCall) -> None:
        self._call = call
        self.task = self._loop.create_task(self._front.handle(call))
        self.task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        call = self._call
        self.task, self._call = None, None
        if self.transport is None:
            return
        if self._close_after or self._front.closing or call is None or not call.keep_alive:
            if not self._in_request:
                self.close()
                return
            # the client is still sending a body no one will read: say no more, read it to its
            # end (or until the idle timeout), then close; closing now would reset the
            # connection, and the client could lose the answer
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._arm_idle()
            return
        if self.writing_paused:  # the client has not read the last answer: wait for it
            self._next_when_drained = True
            return
        self._answered_and_drained()

    def _answered_and_drained(self) -> None:
        """The next request, once the last answer has left our buffers for the kernel's."""
        if self.transport is None:
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._next()

    def _hand_over(self) -> None:
        """From this request on, the connection is aiohttp's."""
        transport = self.transport
        assert transport is not None
        self._front.connections.discard(self)
        if self._reading_paused:
            transport.resume_reading()
        protocol = self._front.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data = bytes(self._raw)
        self._raw.clear()
        self.transport = None
        protocol.data_received(data)

    # -- the connection

    def close_when_answered(self) -> None:
        if self.task is None and not self._in_request:
            self.close()
        else:
            self._close_after = True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _arm_idle(self) -> None:
        if self._front.closing and not self._in_request:
            self.close()
        elif self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self._front.idle_timeout_s, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self.task is None:
            self.close()

    def _write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    def _write_error(self, status: int, message: str) -> None:
        body = orjson.dumps(error_body("invalid_request_error", message))
        head = f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head.encode() + body)
            self.transport.close()

    async def drain(self) -> None:
        if not self.writing_paused:
            return
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        if self._drained is None:
            self._drained = self._loop.create_future()
        await self._drained

    def _wake_drain(self, error: Exception | None) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            if error is None:
                drained.set_result(None)
            else:
                drained.set_exception(error)
                drained.exception()  # retrieved here: no one may be waiting any more


class LeanCall:
    """`handlers.Call` on a lean connection: the request as read, and its answer written to the
    connection in one buffer (a stream: its head with the first chunk, then chunk by chunk).
    Every write is a plain call, so a stream's head as well as its chunks can be written from
    the upstream connection's callback (`heads_from_callbacks`)."""

    heads_from_callbacks = True

    __slots__ = (
        "_chunked",
        "_conn",
        "body",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "path_qs",
        "status",
        "too_large_bytes",
    )

    def __init__(
        self,
        conn: LeanConnection,
        method: str,
        path_qs: str,
        headers: CIMultiDictProxy[str],
        *,
        keep_alive: bool,
        http11: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path_qs = path_qs
        self.headers = headers
        self.keep_alive = keep_alive
        self.http11 = http11
        self.body = b""
        self.too_large_bytes: int | None = None
        self.status = 0
        self._chunked = False

    @property
    def path(self) -> str:
        return self.path_qs.partition("?")[0]

    @property
    def started(self) -> bool:
        """The answer's head has been written."""
        return self.status != 0

    @property
    def client_left(self) -> bool:
        transport = self._conn.transport
        return transport is None or transport.is_closing()

    async def read(self) -> bytes:
        if self.too_large_bytes is not None:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.too_large_bytes, actual_size=self.too_large_bytes + 1
            )
        return self.body

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self._conn._write(self._head(status, headers, f"Content-Length: {len(body)}") + body)

    async def start_stream(self, status: int, headers: Mapping[str, str], first: bytes) -> None:
        if not self.begin_stream(status, headers, first) and self.client_left:
            raise ConnectionResetError("the client closed the connection")

    def begin_stream(self, status: int, headers: Mapping[str, str], first: bytes) -> bool:
        self.status = status
        if self.http11:
            self._chunked = True
            head = self._head(status, headers, "Transfer-Encoding: chunked")
            return self._send(head + chunk_frame(first) if first else head)
        self.keep_alive = False  # HTTP/1.0: no chunks; the body ends when the connection closes
        return self._send(self._head(status, headers, None) + first)

    def send(self, chunk: bytes) -> bool:
        return self._send(chunk_frame(chunk) if self._chunked else chunk)

    def _send(self, data: bytes) -> bool:
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        return not conn.writing_paused

    async def drain(self) -> None:
        await self._conn.drain()

    async def end_stream(self) -> None:
        if self._chunked:
            self._conn._write(b"0\r\n\r\n")

    def abort(self) -> None:
        self._conn.close()

    def _head(self, status: int, headers: Mapping[str, str], framing: str | None) -> bytes:
        version = "1.1" if self.http11 else "1.0"  # as the request's, as aiohttp answers
        lines = [f"HTTP/{version} {status} {REASONS.get(status, 'Unknown')}"]
        lines += [
            f"{name}: {value}" for name, value in headers.items() if name.lower() not in FRAMING
        ]
        if framing is not None:
            lines.append(framing)
        if not self.keep_alive or self._conn._close_after or self._conn._front.closing:
            lines.append("Connection: close")
        lines += ["", ""]
        return "\r\n".join(lines).encode("utf-8", "surrogateescape")


def chunk_frame(data: bytes) -> bytes:
    """One chunk of a `Transfer-Encoding: chunked` body."""
    return b"%x\r\n%b\r\n" % (len(data), data)
