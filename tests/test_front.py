"""The lean front (proxy/front.py) over real sockets: which requests it serves, how it hands a
connection to aiohttp, and HTTP/1.1's corners (split heads, 100-continue, limits, pipelining).

Which of the two holds a connection is read off the front's own books (`held`)."""

from __future__ import annotations

import asyncio
import json
import socket

from aiohttp.test_utils import TestServer
from conftest import ALICE_KEY, BOB_KEY, settled

from proxy.appkeys import STORE

CALL = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Hello there"}],
}
BODY = json.dumps(CALL).encode()
STREAM_BODY = json.dumps({**CALL, "stream": True}).encode()


def post(body: bytes = BODY, *, extra: str = "", key: str = ALICE_KEY) -> bytes:
    return (
        f"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\nx-api-key: {key}\r\n"
        f"Content-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer: status, headers (names lowered) and body (by Content-Length, or chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode().split("\r\n")[:-2]
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readline()).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
    else:
        body = await reader.read()
    return int(status_line.split()[1]), headers, body


def held(proxy: TestServer) -> tuple[int, int]:
    """Open connections: (the lean front's, aiohttp's)."""
    front = proxy.runner.server
    return len(front.connections), front.aiohttp_connections


async def connect(proxy: TestServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(proxy.host, proxy.port)


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 10) == b""


async def test_messages_and_head_are_served_lean_on_one_kept_alive_connection(
    proxy: TestServer,
) -> None:
    reader, writer = await connect(proxy)
    writer.write(b"HEAD / HTTP/1.1\r\nHost: proxy\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert (status, headers["content-length"], held(proxy)) == (200, "0", (1, 0))
    for _ in range(3):
        writer.write(post())
        status, headers, body = await read_response(reader)
        assert status == 200 and held(proxy) == (1, 0)
        assert json.loads(body)["type"] == "message"
        assert headers["x-usage-billing"] == "included" and "x-usage-cost" in headers
    writer.close()
    records = await settled(proxy, 3)
    assert {r.status for r in records} == {"posted"}


async def test_another_route_hands_the_connection_to_aiohttp_which_serves_messages_too(
    proxy: TestServer,
) -> None:
    reader, writer = await connect(proxy)
    for body in (BODY, STREAM_BODY):
        writer.write(post(body))
        status, headers, _ = await read_response(reader)
        assert status == 200 and held(proxy) == (1, 0)
    writer.write(
        f"GET /v1/usage HTTP/1.1\r\nHost: proxy\r\nx-api-key: {ALICE_KEY}\r\n\r\n".encode()
    )
    status, headers, body = await read_response(reader)
    assert status == 200 and held(proxy) == (0, 1)
    assert json.loads(body)["member"]["email"] == "alice@acme.test"
    writer.write(post())  # the connection is aiohttp's now: the same handler, its objects
    status, headers, body = await read_response(reader)
    assert status == 200 and held(proxy) == (0, 1)
    assert json.loads(body)["type"] == "message" and "x-usage-cost" in headers
    writer.write(post(STREAM_BODY))  # a stream's head, written by aiohttp's response
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.startswith(b"event: message_start") and b"event: message_stop" in body
    writer.close()
    assert {r.status for r in await settled(proxy, 4)} == {"posted"}


async def test_a_head_that_arrives_byte_by_byte_is_read_whole(proxy: TestServer) -> None:
    for request, holders in (
        (post(), (1, 0)),
        (b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n", (0, 1)),
    ):
        reader, writer = await connect(proxy)
        for byte in request[:24]:  # past the bytes that decide who serves it
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(request[24:])
        status, _, _ = await read_response(reader)
        assert (status, held(proxy)) == (200, holders)
        writer.close()
        await asyncio.sleep(0.05)  # closed on the proxy's side too


async def test_expect_100_continue_is_answered_before_the_body(proxy: TestServer) -> None:
    reader, writer = await connect(proxy)
    head, _, body = post(extra="Expect: 100-continue\r\n").partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(body)
    status, _, answer = await read_response(reader)
    assert status == 200 and json.loads(answer)["type"] == "message"
    writer.close()


async def test_a_body_over_the_limit_is_a_413_and_the_connection_closes(start_proxy) -> None:
    proxy = await start_proxy(server="max_body_mb = 0.05")  # 50,000 bytes
    big = json.dumps({**json.loads(BODY), "metadata": {"x": "y" * 60_000}}).encode()
    reader, writer = await connect(proxy)  # declared too long: answered from the head
    writer.write(post(big))
    status, headers, body = await read_response(reader)
    assert status == 413 and json.loads(body)["error"]["type"] == "request_too_large"
    assert headers["connection"] == "close" and await closed(reader)
    writer.close()

    reader, writer = await connect(proxy)  # chunked: refused once it grows past the limit
    writer.write(
        f"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\nx-api-key: {ALICE_KEY}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    for start in range(0, len(big), 8192):
        piece = big[start : start + 8192]
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
    writer.write(b"0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 413 and await closed(reader)
    writer.close()
    assert list(await proxy.app[STORE].recent_requests(5)) == []  # refused before admission


async def test_a_chunked_body_within_the_limit_is_served(proxy: TestServer) -> None:
    reader, writer = await connect(proxy)
    writer.write(
        f"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\nx-api-key: {ALICE_KEY}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
        + b"%x\r\n%b\r\n" % (len(BODY[:10]), BODY[:10])
        + b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY[10:]), BODY[10:])
    )
    status, _, body = await read_response(reader)
    assert status == 200 and held(proxy) == (1, 0) and json.loads(body)["type"] == "message"
    writer.close()


async def test_what_is_not_http_is_a_400_and_the_connection_closes(proxy: TestServer) -> None:
    reader, writer = await connect(proxy)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nContent-Length: ten\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 400 and json.loads(body)["type"] == "error"
    assert await closed(reader)
    writer.close()


async def test_an_http_1_0_request_is_answered_and_closed(proxy: TestServer) -> None:
    reader, writer = await connect(proxy)
    writer.write(post().replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(body)["type"] == "message" and await closed(reader)
    writer.close()


async def test_an_http_1_0_stream_is_sent_unframed_and_ends_with_the_connection(
    proxy: TestServer,
) -> None:
    reader, writer = await connect(proxy)
    writer.write(post(STREAM_BODY).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    status, headers, body = await read_response(reader)  # no length, not chunked: to the close
    assert status == 200 and headers["connection"] == "close"
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert body.startswith(b"event: message_start") and body.rstrip().endswith(b"}")
    assert b"event: message_stop" in body
    writer.close()
    assert {r.status for r in await settled(proxy, 1)} == {"posted"}


async def test_a_request_sent_during_an_answer_waits_its_turn(proxy: TestServer) -> None:
    reader, writer = await connect(proxy)
    writer.write(post(STREAM_BODY, extra="x-mock-deltas: 5\r\nx-mock-delay-ms: 20\r\n"))
    await asyncio.sleep(0.03)  # the stream is under way
    writer.write(post())
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert b"message_stop" in body
    status, headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["type"] == "message"
    writer.close()
    assert {r.status for r in await settled(proxy, 2)} == {"posted"}


async def test_two_requests_in_one_write_get_the_first_answer_then_a_close(
    proxy: TestServer,
) -> None:
    reader, writer = await connect(proxy)
    writer.write(post() + post())  # pipelined: no SDK does this
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await closed(reader)
    writer.close()
    assert len(await settled(proxy, 1)) == 1


async def test_a_request_that_stops_halfway_is_closed_like_an_idle_connection(
    start_proxy,
) -> None:
    proxy = await start_proxy(server="idle_timeout_s = 0.3")
    reader, writer = await connect(proxy)
    writer.write(post()[:40])  # the head, cut short; then nothing
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert held(proxy) == (0, 0)


async def test_the_next_request_waits_until_the_client_has_read_the_last_answer(
    proxy: TestServer,
) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads slowly
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (proxy.host, proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)  # reads no more
    large = {**json.loads(BODY), "model": "claude-haiku-4-5", "max_tokens": 4_000_000}
    writer.write(post(json.dumps(large).encode(), extra="x-mock-output-tokens: 4000000\r\n"))
    store = proxy.app[STORE]
    for _ in range(100):  # answered: most of its 24 MB wait in the proxy's buffers
        if any(r.status == "posted" for r in await store.recent_requests(5)):
            break
        await asyncio.sleep(0.05)
    writer.write(post(key=BOB_KEY))  # alice's session quota is spent now
    await writer.drain()
    await asyncio.sleep(0.3)
    assert len(await store.recent_requests(5)) == 1  # the second is not even admitted yet
    status, _, body = await read_response(reader)
    assert status == 200 and len(body) > 20_000_000
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["type"] == "message"
    writer.close()
    assert len(await settled(proxy, 2)) == 2
