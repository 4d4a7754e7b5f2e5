"""The upstream HTTP/1.1 client (proxy/http1.py) against servers on 127.0.0.1 that answer with
bytes written by hand: keep-alive, the pool's limit, bodies of every framing, encodings, and
every way a server can fail it."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy import http1
from proxy.http1 import Client, UpstreamError, UpstreamTimeout

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Answer = Callable[[Reader, Writer], Awaitable[None]]


def ok(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(head).encode() + body


async def read_request(reader: Reader) -> tuple[bytes, bytes]:
    """One request: its head, and its body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class Server:
    """A TCP server that runs `answer` on each connection, counting the connections."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def _serve(self, reader: Reader, writer: Writer) -> None:
        self.connections += 1
        try:
            await self.answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[Server]:
    server = Server(answer)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    async with listener:
        yield server


def client(
    url: str, *, connections_max: int = 4, read_timeout_s: float = 5.0, idle_keep_s: float = 15.0
) -> Client:
    return Client(
        url,
        connections_max=connections_max,
        connect_timeout_s=2.0,
        read_timeout_s=read_timeout_s,
        idle_keep_s=idle_keep_s,
    )


def keep_alive(body: bytes = b'{"ok": true}', *extra: str) -> Answer:
    """Answer every request on the connection with `body`."""

    async def answer(reader: Reader, writer: Writer) -> None:
        while True:
            head, _ = await read_request(reader)
            answer.requests.append(head)  # type: ignore[attr-defined]
            writer.write(ok(body, *extra))
            await writer.drain()

    answer.requests = []  # type: ignore[attr-defined]
    return answer


async def test_sequential_requests_share_one_connection_and_send_what_they_were_given() -> None:
    answer = keep_alive()
    async with serving(answer) as server:
        upstream = client(server.url + "/base/")
        try:
            for index in range(5):
                response = await upstream.request(
                    "POST", f"/v1/messages?n={index}", [("x-api-key", "k")], b"hello"
                )
                assert (response.status, await response.read()) == (200, b'{"ok": true}')
                response.release()
        finally:
            await upstream.close()
    assert server.connections == 1
    first = answer.requests[0].decode()  # type: ignore[attr-defined]
    assert first.startswith("POST /base/v1/messages?n=0 HTTP/1.1\r\n")
    assert f"Host: {server.url.removeprefix('http://')}\r\n" in first
    assert "x-api-key: k\r\n" in first and "Content-Length: 5\r\n" in first
    assert "Accept-Encoding: identity\r\n" in first


async def test_concurrent_requests_never_open_more_than_connections_max() -> None:
    open_now = 0
    open_most = 0

    async def slow(reader: Reader, writer: Writer) -> None:
        nonlocal open_now, open_most
        open_now += 1
        open_most = max(open_most, open_now)
        try:
            while True:
                await read_request(reader)
                await asyncio.sleep(0.01)
                writer.write(ok(b"x"))
                await writer.drain()
        finally:
            open_now -= 1

    async with serving(slow) as server:
        upstream = client(server.url, connections_max=3)

        async def one() -> bytes:
            response = await upstream.request("POST", "/", [], b"")
            try:
                return await response.read()
            finally:
                response.release()

        try:
            assert await asyncio.gather(*(one() for _ in range(30))) == [b"x"] * 30
        finally:
            await upstream.close()
    assert open_most == 3 and server.connections == 3


async def test_a_chunked_body_arrives_in_pieces_as_sent() -> None:
    step = asyncio.Event()

    async def chunked(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await step.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # kept alive: a second request on the same connection
        writer.write(ok(b"again"))
        await writer.drain()
        await reader.read()

    async with serving(chunked) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("POST", "/", [], b"{}")
            assert response.content_type == "text/event-stream"
            pieces = response.chunks()
            assert await anext(pieces) == b"first"  # before the server sent the rest
            step.set()
            assert [piece async for piece in pieces] == [b"second"]
            again = await upstream.request("POST", "/", [], b"{}")
            assert await again.read() == b"again"
        finally:
            await upstream.close()
    assert server.connections == 1


async def test_gzip_is_decoded_and_a_body_without_length_ends_with_the_connection() -> None:
    packed = gzip.compress(b'{"usage": {}}' * 100)

    async def gzipped(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(ok(packed, "Content-Encoding: gzip"))
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end")
        await writer.drain()

    async with serving(gzipped) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("POST", "/", [], b"")
            assert await response.read() == b'{"usage": {}}' * 100
            response = await upstream.request("POST", "/", [], b"")
            assert await response.read() == b"to the end"
        finally:
            await upstream.close()


async def test_a_connection_the_server_closes_is_not_reused_nor_one_idle_too_long() -> None:
    async def one_each(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(ok(b"once", "Connection: close"))
        await writer.drain()

    async with serving(one_each) as server:
        upstream = client(server.url)
        try:
            for _ in range(3):
                assert await (await upstream.request("POST", "/", [], b"")).read() == b"once"
        finally:
            await upstream.close()
    assert server.connections == 3

    answer = keep_alive()
    async with serving(answer) as server:
        upstream = client(server.url, idle_keep_s=0.05)
        try:
            await (await upstream.request("POST", "/", [], b"")).read()
            await (await upstream.request("POST", "/", [], b"")).read()  # reused: 1 connection
            await asyncio.sleep(0.1)  # the idle one is now too old
            await (await upstream.request("POST", "/", [], b"")).read()
        finally:
            await upstream.close()
    assert server.connections == 2


async def test_head_completes_without_a_body() -> None:
    async def head(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(head) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("HEAD", "/", [], b"")
            assert (response.status, await response.read()) == (200, b"")
        finally:
            await upstream.close()


async def test_a_refused_connection_is_an_upstream_error() -> None:
    async with serving(keep_alive()) as server:
        url = server.url
    upstream = client(url)  # nothing listens there any more
    with pytest.raises(UpstreamError, match="cannot connect"):
        await upstream.request("POST", "/", [], b"")
    assert upstream.connections_open == 0


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed the connection"),
        (b"NOT HTTP AT ALL\r\n\r\n", "not valid HTTP"),
        (ok(b"xx", "Content-Encoding: br"), "content-encoding br"),
    ],
)
async def test_a_broken_answer_fails_the_response_and_frees_its_slot(
    reply: bytes, message: str
) -> None:
    async def broken(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with serving(broken) as server:
        upstream = client(server.url, connections_max=1)
        try:
            for _ in range(2):  # the second gets the one slot: the first freed it
                with pytest.raises(UpstreamError, match=message):
                    response = await upstream.request("POST", "/", [], b"")
                    await response.read()
        finally:
            await upstream.close()


async def test_silence_before_the_head_or_mid_body_is_a_timeout() -> None:
    async def silent_mid_body(reader: Reader, writer: Writer) -> None:
        head, _ = await read_request(reader)
        if b"/mid" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            await writer.drain()
        await reader.read()

    async with serving(silent_mid_body) as server:
        upstream = client(server.url, read_timeout_s=0.2)
        try:
            with pytest.raises(UpstreamTimeout, match=r"sent nothing for 0\.2 s"):
                await upstream.request("POST", "/head", [], b"")
            response = await upstream.request("POST", "/mid", [], b"")
            with pytest.raises(UpstreamTimeout):
                await response.read()
        finally:
            await upstream.close()


class Firehose:
    """An answer of 32 MB, beyond what the sockets can hold between us, sent as fast as the
    client takes it; `sent`: how much so far."""

    total = 128 * http1.HIGH_WATER_BYTES

    def __init__(self) -> None:
        self.sent = 0

    async def __call__(self, reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {self.total}\r\n\r\n".encode())
        piece = b"x" * 65536
        while self.sent < self.total:
            writer.write(piece)
            self.sent += len(piece)
            await writer.drain()


async def test_a_reader_that_falls_behind_pauses_the_server_instead_of_buffering() -> None:
    firehose = Firehose()
    async with serving(firehose) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("POST", "/", [], b"")
            pieces = response.chunks()
            received = len(await anext(pieces))
            await asyncio.sleep(0.3)  # we read nothing: the server must be held back
            assert firehose.sent < firehose.total
            async for chunk in pieces:
                received += len(chunk)
            assert received == firehose.total == firehose.sent
        finally:
            await upstream.close()


async def test_push_hands_each_piece_to_the_sink_as_it_arrives_until_the_body_ends() -> None:
    handed = [asyncio.Event(), asyncio.Event()]  # the sink has had the first, the second piece

    async def piece_by_piece(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await handed[0].wait()  # each piece goes on only once the last one reached the sink
        writer.write(b"6\r\nsecond\r\n")
        await writer.drain()
        await handed[1].wait()
        writer.write(b"0\r\n\r\n")
        await read_request(reader)  # kept alive: a second request on the same connection
        writer.write(ok(b"again"))
        await writer.drain()
        await reader.read()

    pieces: list[bytes] = []
    tasks: list[asyncio.Task | None] = []

    def sink(piece: bytes) -> bool:
        handed[len(pieces)].set()
        pieces.append(piece)
        tasks.append(asyncio.current_task())
        return True

    async with serving(piece_by_piece) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("POST", "/", [], b"{}")
            assert await asyncio.wait_for(response.push(sink), 5) is True
            assert pieces == [b"first", b"second"]
            # the first came with the head, before push(); the second went straight from the
            # connection's callback to the sink, no task woken for it
            assert tasks[0] is not None and tasks[1] is None
            again = await upstream.request("POST", "/", [], b"{}")
            assert await again.read() == b"again"
        finally:
            await upstream.close()
    assert server.connections == 1


async def test_the_sink_on_head_gives_takes_the_first_piece_before_request_returns() -> None:
    async def head_with_a_piece(reader: Reader, writer: Writer) -> None:
        await read_request(reader)  # the head and the first piece in one write, as a stream's
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # no sink this time: the body waits for the reader
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops")
        await writer.drain()
        await reader.read()

    seen: list[tuple[bytes, bool, asyncio.Task | None]] = []  # piece, requester resumed, task
    resumed = False

    def sink(piece: bytes) -> bool:
        seen.append((piece, resumed, asyncio.current_task()))
        return True

    def on_head(response: http1.Response) -> http1.Sink | None:
        return sink if response.status == 200 else None

    async with serving(head_with_a_piece) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("POST", "/", [], b"{}", on_head=on_head)
            resumed = True
            assert await asyncio.wait_for(response.push(sink), 5) is True
            # both from the connection's callback; the first before request() had returned
            assert seen == [(b"first", False, None), (b"second", True, None)]
            refused = await upstream.request("POST", "/", [], b"{}", on_head=on_head)
            assert (refused.status, await refused.read()) == (500, b"oops")
        finally:
            await upstream.close()
    assert server.connections == 1


class Taker:
    """A sink that counts what it takes and says stop once it has taken `pieces_max` pieces
    (None: it takes all)."""

    def __init__(self, pieces_max: int | None) -> None:
        self.pieces_max = pieces_max
        self.pieces = 0
        self.taken_bytes = 0

    def __call__(self, chunk: bytes) -> bool:
        self.pieces += 1
        self.taken_bytes += len(chunk)
        return self.pieces_max is None or self.pieces < self.pieces_max


async def test_a_sink_from_on_head_that_says_stop_makes_push_answer_false_at_once() -> None:
    firehose = Firehose()
    sink = Taker(pieces_max=1)
    async with serving(firehose) as server:
        upstream = client(server.url, read_timeout_s=5.0)
        try:
            response = await upstream.request("POST", "/", [], b"", on_head=lambda _: sink)
            await asyncio.sleep(0.1)  # the body's first piece reached the sink, which said stop
            assert sink.pieces == 1 and sink.taken_bytes < firehose.total
            sink.pieces_max = None  # push says stop at once, as the sink did, handing it nothing
            assert await asyncio.wait_for(response.push(sink), 5) is False
            assert sink.pieces == 1
            assert await asyncio.wait_for(response.push(sink), 10) is True
            assert sink.taken_bytes == firehose.total == firehose.sent
        finally:
            await upstream.close()


async def test_a_sink_that_says_stop_holds_the_server_back_until_pushed_again() -> None:
    firehose = Firehose()
    sink = Taker(pieces_max=3)
    async with serving(firehose) as server:
        upstream = client(server.url, read_timeout_s=5.0)
        try:
            response = await upstream.request("POST", "/", [], b"")
            assert await asyncio.wait_for(response.push(sink), 5) is False
            await asyncio.sleep(0.3)  # nobody pushes: the sink gets nothing more, the server waits
            assert sink.pieces == 3 and sink.taken_bytes < firehose.total > firehose.sent
            sink.pieces_max = None
            assert await asyncio.wait_for(response.push(sink), 10) is True
            assert sink.taken_bytes == firehose.total == firehose.sent
        finally:
            await upstream.close()


async def test_push_raises_when_the_server_breaks_off_the_body() -> None:
    async def cut(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    pieces: list[bytes] = []
    async with serving(cut) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("POST", "/", [], b"")
            with pytest.raises(UpstreamError, match="closed the connection"):
                await asyncio.wait_for(response.push(lambda piece: pieces.append(piece) or True), 5)
            assert pieces == [b"half"]
        finally:
            await upstream.close()


async def test_push_hands_the_sink_a_gzip_body_decoded() -> None:
    events = b"".join(b'event: ping\ndata: {"n": %d}\n\n' % (n * n) for n in range(2000))
    packed = gzip.compress(events)
    half = len(packed) // 2

    async def gzipped_in_two(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n")
        writer.write(f"Transfer-Encoding: chunked\r\n\r\n{half:x}\r\n".encode())
        writer.write(packed[:half] + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the second half through the connection's callback
        rest = packed[half:]
        writer.write(f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    pieces: list[bytes] = []
    async with serving(gzipped_in_two) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("POST", "/", [], b"")
            sink = pieces.append
            assert await asyncio.wait_for(response.push(lambda p: sink(p) or True), 5) is True
        finally:
            await upstream.close()
    assert b"".join(pieces) == events and len(pieces) >= 2


async def test_a_sink_that_fails_fails_the_push_with_its_own_error() -> None:
    async def two_pieces(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the second comes through the connection's callback
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    def broken(piece: bytes) -> bool:
        raise ZeroDivisionError("a bug in the sink")

    async with serving(two_pieces) as server:
        upstream = client(server.url)
        try:
            response = await upstream.request("POST", "/", [], b"")
            assert await response.next_chunk() == b"first"
            with pytest.raises(ZeroDivisionError):  # not an UpstreamError: not the server's
                await asyncio.wait_for(response.push(broken), 5)
        finally:
            await upstream.close()


async def test_a_response_left_unread_closes_its_connection() -> None:
    async def endless(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async with serving(endless) as server:
        upstream = client(server.url, connections_max=1)
        try:
            response = await upstream.request("POST", "/", [], b"")
            assert await anext(response.chunks()) == b"x"
            response.release()
            await asyncio.sleep(0.05)
            assert upstream.connections_open == 0
            second = await upstream.request("POST", "/", [], b"")  # the slot came back
            second.release()
        finally:
            await upstream.close()
    assert server.connections == 2


async def test_a_line_break_in_a_header_is_refused_before_sending() -> None:
    async with serving(keep_alive()) as server:
        upstream = client(server.url)
        with pytest.raises(UpstreamError, match="line break"):
            await upstream.request("POST", "/", [("x-evil", "a\r\nx-api-key: other")], b"")
    assert server.connections == 0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to test TLS with")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_verifies_the_server_and_keeps_the_connection(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    answer = keep_alive(b"secret")
    listener = await asyncio.start_server(lambda r, w: answer(r, w), "127.0.0.1", 0, ssl=served)
    url = f"https://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    async with listener:
        trusting = Client(
            url,
            connections_max=2,
            connect_timeout_s=2.0,
            read_timeout_s=5.0,
            tls=ssl.create_default_context(cafile=str(cert)),
        )
        try:
            for _ in range(2):
                assert await (await trusting.request("GET", "/", [], b"")).read() == b"secret"
            assert trusting.connections_open == 1
        finally:
            await trusting.close()
        strict = client(url)  # the system's CAs do not know this certificate
        with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
            await strict.request("GET", "/", [], b"")


async def test_a_body_that_ends_while_reading_is_paused_leaves_the_connection_readable() -> None:
    """Its last bytes cross the high-water mark: reading pauses as the body completes, and the
    connection goes back to the pool; the next answer on it must still be read."""
    body = b"y" * (http1.HIGH_WATER_BYTES + 100)

    async def two(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(ok(body))
        await read_request(reader)
        writer.write(ok(b"next"))
        await writer.drain()
        await reader.read()

    async with serving(two) as server:
        upstream = client(server.url, read_timeout_s=1.0)
        try:
            first = await upstream.request("POST", "/", [], b"")
            await asyncio.sleep(0.1)  # the whole body arrives, unread
            assert await first.read() == body
            second = await asyncio.wait_for(upstream.request("POST", "/", [], b""), 5)
            assert await second.read() == b"next"
        finally:
            await upstream.close()
    assert server.connections == 1
