"""A lean HTTP/1.1 client for the upstream leg: keep-alive connections in a pool, responses
parsed by httptools (llhttp, in C), bodies handed over chunk by chunk as they arrive.

Why not aiohttp's ClientSession, which the proxy used before: on this path it spends about
0.13 ms of CPU per request (URL handling, cookie jar, timeouts, tracing hooks, stream readers),
this client about 0.04 ms (docs/performance.md). It does only what the proxy needs: one origin,
no redirects, no cookies, no proxies; `identity` bodies, or gzip/deflate decoded with zlib.

- Connections: at most `connections_max` open; a request waits for one beyond that. A
  connection goes back to the pool once its response has arrived to the end (its body is then
  held by the `Response`), and is closed when the response is left unread or the server asked
  for it (`Connection: close`). Connections idle for `idle_keep_s` are closed rather than
  reused, before a server's own keep-alive timeout closes them under a request.
- Timeouts: `connect_timeout_s` to open a connection (TLS included); `read_timeout_s` without a
  byte from the server while a response is awaited (the head or the next part of the body).
- Bodies: read whole (`read`), piece by piece by a task (`next_chunk`, `chunks`), or pushed
  (`push`): each piece handed to a callable from the connection's own callback as it arrives,
  with no task woken a piece (the proxy's streams: docs/performance.md). A request's `on_head`
  is called from that callback when the head arrives and may hand back such a callable at once,
  so that even the first piece goes on before the requesting task is woken.
- Flow: a body buffered beyond HIGH_WATER_BYTES pauses reading from the server until the reader
  has taken it below LOW_WATER_BYTES; a slow client so slows the upstream, not our memory.
- Errors: `UpstreamError` (refused, reset, closed early, not HTTP), and `UpstreamTimeout`; an
  error of the reader's own sink (`push`) reaches the reader as itself, not as the server's.
  No request is sent twice: a POST that may have reached the server is never retried here.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

IDLE_KEEP_S = 15.0  # aiohttp's keep-alive default; servers keep idle connections longer
HIGH_WATER_BYTES = 256 * 1024
LOW_WATER_BYTES = 64 * 1024
# A sink: takes a piece of the body, answers False to stop for now (see `Response.push`).
Sink = Callable[[bytes], bool]
# Called with a response as its head arrives; may answer the sink for its body (`request`).
OnHead = Callable[["Response"], Sink | None]
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class UpstreamError(Exception):
    """The upstream server could not be reached, or broke off or garbled its answer."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """No connection within connect_timeout_s, or no byte within read_timeout_s."""


class Client:
    """Requests to one origin (`base_url`: http or https, with an optional path prefix)."""

    def __init__(
        self,
        base_url: str,
        *,
        connections_max: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        idle_keep_s: float = IDLE_KEEP_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base URL must be http(s)://host[:port][/path]: {base_url}")
        self._host = parts.hostname
        https = parts.scheme == "https"
        self._tls = (tls or ssl.create_default_context()) if https else None  # the system's CAs
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._prefix = parts.path.rstrip("/")
        self._connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle_keep_s = idle_keep_s
        self._slots = asyncio.Semaphore(connections_max)
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._closed = False

    @property
    def connections_open(self) -> int:
        return len(self._all)

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        on_head: OnHead | None = None,
    ) -> Response:
        """Send a request (`target`: path and query, after the base URL's path) and return once
        the response head has arrived; its body then follows through the `Response`. `on_head`,
        when given, is called with the `Response` from the connection's callback as the head
        arrives; the sink it answers (or None) takes the body's pieces from then on, as `push`
        would, until the task calls `push` with it."""
        head = self._head(method, target, headers, len(body))
        await self._slots.acquire()
        try:
            conn = self._reuse() or await self._open()
            response = Response(conn, head_only=method == "HEAD", on_head=on_head)
            conn.send(response, head, body)
        except BaseException:
            self._slots.release()
            raise
        try:
            await response.wait_head()
        except BaseException:  # cancelled (the client left) or failed: free the connection
            response.release()
            raise
        return response

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    def _head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], length: int
    ) -> bytes:
        lines = [f"{method} {self._prefix}{target} HTTP/1.1", f"Host: {self._host_header}"]
        for name, value in headers:
            if "\n" in value or "\r" in value:
                raise UpstreamError(f"header {name} holds a line break")
            lines.append(f"{name}: {value}")
        lines += ["Accept-Encoding: identity", f"Content-Length: {length}", "", ""]
        return "\r\n".join(lines).encode("utf-8", "surrogateescape")

    def _reuse(self) -> _Connection | None:
        now_s = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable and now_s - conn.idle_since_s < self._idle_keep_s:
                return conn
            conn.close()
        return None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"no connection to {self._host}:{self._port} within {self._connect_timeout_s:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {self._host}:{self._port}: {exc}") from None
        self._all.add(conn)
        return conn

    def _finished(self, conn: _Connection, *, reusable: bool) -> None:
        """A response ended (read to its end, failed or left): free its slot, keep or close."""
        self._slots.release()
        if reusable and not self._closed:
            conn.idle_since_s = asyncio.get_running_loop().time()
            self._idle.append(conn)
        else:
            conn.close()

    def _lost(self, conn: _Connection) -> None:
        self._all.discard(conn)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one response at a time."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._response: Response | None = None
        self._headers: list[tuple[str, str]] = []
        self._read_s = 0.0  # when the last byte arrived
        self._timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.usable = True
        self.idle_since_s = 0.0

    # -- driven by Client and Response

    def send(self, response: Response, head: bytes, body: bytes) -> None:
        assert self._transport is not None
        self._response = response
        self._headers = []
        self._read_s = self._loop.time()
        self._arm(self._client.read_timeout_s)
        self._transport.writelines((head, body) if body else (head,))

    def pause(self) -> None:
        if not self.paused and self._transport is not None:
            self.paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self._transport is not None:
            self.paused = False
            self._read_s = self._loop.time()
            self._transport.resume_reading()

    def close(self) -> None:
        self.usable = False
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._read_s = self._loop.time()
        if self._response is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # our own code failed (a push's sink):
            self._fail(exc.__context__ or exc)  # its reader gets that error, not the server's
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream answer is not valid HTTP/1.1: {exc}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self._client._lost(self)  # _complete and _fail below stop the read timer
        response = self._response
        if response is not None and response.reads_to_close and response.has_head:
            self._complete(reusable=False)  # a body without a length ends with the connection
        else:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"the upstream server closed the connection{reason}"))

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim answer; the real head follows
            self._headers = []
            return
        response.set_head(status, CIMultiDict(self._headers))
        self._headers = []
        if response.head_only:
            self._complete(reusable=False)  # HEAD: no body follows, whatever its length says

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response.feed(body)

    def on_message_complete(self) -> None:
        if self._response is not None and self._response.has_head:
            self._complete(reusable=self._parser.should_keep_alive())

    # -- the end of a response

    def _complete(self, *, reusable: bool) -> None:
        response, self._response = self._response, None
        self._disarm()
        self.resume()  # paused for a body now whole in its Response: the next one needs reading
        if response is not None:
            error = response.finish()
            self._client._finished(self, reusable=reusable and self.usable and error is None)

    def _fail(self, error: Exception) -> None:
        response, self._response = self._response, None
        self._disarm()
        self.close()
        if response is not None:
            response.fail(error)
            self._client._finished(self, reusable=False)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, after_s: float) -> None:
        self._timer = self._loop.call_at(self._loop.time() + after_s, self._check_idle)

    def _check_idle(self) -> None:
        """No byte for read_timeout_s while a response is awaited: give up on it. The timer is
        set once a request and moved on only when it fires (not at every chunk)."""
        timeout_s = self._client.read_timeout_s
        quiet_s = self._loop.time() - self._read_s
        if self.paused or quiet_s < timeout_s:  # paused: our reader is slow, not the server
            self._arm(timeout_s - quiet_s if not self.paused else timeout_s)
            return
        self._timer = None
        self._fail(UpstreamTimeout(f"the upstream server sent nothing for {timeout_s:g} s"))


class Response:
    """The status and headers of an upstream answer, and its body as it arrives."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_decoder",
        "_done",
        "_error",
        "_head",
        "_sink",
        "_sink_stopped",
        "_waiter",
        "head_only",
        "headers",
        "on_head",
        "reads_to_close",
        "status",
    )

    def __init__(
        self, conn: _Connection, *, head_only: bool = False, on_head: OnHead | None = None
    ) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._decoder: zlib._Decompress | None = None
        self._done = False
        self._error: Exception | None = None
        self._head = False
        self._sink: Sink | None = None
        self._sink_stopped = False
        self._waiter: asyncio.Future[None] | None = None
        self.head_only = head_only
        self.on_head = on_head
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.reads_to_close = False  # no length, not chunked: the body ends with the connection

    @property
    def has_head(self) -> bool:
        return self._head

    @property
    def content_type(self) -> str:
        value = self.headers.get("content-type", "")
        return value.split(";", 1)[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body (decoded)."""
        parts: list[bytes] = []
        chunks = self._chunks
        while True:
            parts += chunks
            chunks.clear()
            self._buffered = 0
            if not self._done:  # once done, the connection may carry another response
                self._conn.resume()
            if self._error is not None:
                raise self._error
            if self._done:
                return b"".join(parts)
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, in the pieces they arrived in."""
        while chunk := await self.next_chunk():
            yield chunk

    async def next_chunk(self) -> bytes:
        """The next piece of the body as it arrived; b"" once the body has ended."""
        chunks = self._chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                if not self._done and self._buffered < LOW_WATER_BYTES:
                    self._conn.resume()  # a no-op unless paused
                return chunk
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            await self._wait()

    async def push(self, sink: Sink) -> bool:
        """Hand the body to `sink` piece by piece as it arrives, called from the connection's
        own callback: no task switch a piece. Answer True once the body has ended, False as soon
        as `sink` answers False (its own buffer is full, or its reader left): what arrives
        meanwhile waits here, up to HIGH_WATER_BYTES as for `chunks()`, until the next call.
        Raise what cut it: an UpstreamError, or the sink's own error."""
        if self._sink_stopped:  # the sink `on_head` gave said stop before this call
            self._sink_stopped = False
            return False
        chunks = self._chunks
        while True:
            while chunks:  # arrived before, or after the sink last said stop
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                if not sink(chunk):
                    return False
            if self._error is not None:
                raise self._error
            if self._done:
                return True
            self._sink = sink
            self._conn.resume()
            try:
                await self._wait()  # woken at the end, or when the sink says stop
            finally:
                self._sink = None
            if self._sink_stopped:
                self._sink_stopped = False
                return False

    def release(self) -> None:
        """Done with it: a response not read to its end closes its connection (the server
        stops producing it)."""
        if not self._done:
            self._conn._fail(UpstreamError("the response was left unread"))
        self._chunks.clear()

    # -- driven by the connection

    async def wait_head(self) -> None:
        while not self._head:
            if self._error is not None:
                raise self._error
            await self._wait()

    def set_head(self, status: int, headers: CIMultiDict[str]) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(headers)
        self._head = True
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in _DECODERS:
            self._decoder = zlib.decompressobj(_DECODERS[encoding])
        elif encoding != "identity":  # never asked for (Accept-Encoding: identity)
            self._conn._fail(UpstreamError(f"the upstream answer uses content-encoding {encoding}"))
            return
        self.reads_to_close = (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )
        if self.on_head is not None:
            self._sink = self.on_head(self)
        self._wake()

    def feed(self, chunk: bytes) -> None:
        if self._decoder is not None:
            try:
                chunk = self._decoder.decompress(chunk)
            except zlib.error as exc:
                self._conn._fail(UpstreamError(f"the upstream body does not decode: {exc}"))
                return
            if not chunk:
                return
        sink = self._sink
        if sink is not None:
            if not sink(chunk):
                self._sink = None  # what follows waits in _chunks until the next push()
                self._sink_stopped = True
                self._wake()
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER_BYTES:
            self._conn.pause()
        self._wake()

    def finish(self) -> Exception | None:
        if self._decoder is not None and self._error is None:
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
        self._done = True
        self._wake()
        return self._error

    def fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._done = True
        self._wake()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
