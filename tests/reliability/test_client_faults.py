"""Client faults: many clients leaving mid-stream, a client that reads slowly from a large
stream (back-pressure: the proxy's memory stays bounded), and many idle connections (closed
after `server.idle_timeout_s`)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import aiohttp

from proxy.mock_upstream import MOCK_STATE_KEY
from tests.conftest import ALICE_KEY, settled
from tests.reliability.conftest import store_rows, stream_message

LARGE_OUTPUT_TOKENS = 4_000_000  # about 24 MB of SSE
SLOW_RECEIVE_BUFFER_BYTES = 4096


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_fifty_clients_leaving_mid_stream_close_upstream_and_are_charged(
    start_proxy, upstream
) -> None:
    proxy = await start_proxy()
    url = str(proxy.make_url("")).rstrip("/")
    slow = {"x-mock-deltas": "100", "x-mock-output-tokens": "200", "x-mock-delay-ms": "50"}

    async def leave_after_some_bytes() -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{url}/v1/messages",
                json={
                    "model": "claude-haiku-4-5",
                    "max_tokens": 1024,
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                headers={"x-api-key": ALICE_KEY, **slow},
            ) as response,
        ):
            received = b""
            async for chunk in response.content.iter_any():
                received += chunk
                if received.count(b"content_block_delta") >= 3:
                    break  # leaving the block closes the connection mid-stream

    await asyncio.gather(*(leave_after_some_bytes() for _ in range(50)))
    records = await settled(proxy, 50, timeout_s=30)
    assert {(r.status, r.outcome, r.usage.output_estimated) for r in records} == {
        ("posted", "client_disconnected", True)
    }
    assert all(0 < r.usage.output_tokens < 200 and r.cost_nanos > 0 for r in records)
    state = upstream.app[MOCK_STATE_KEY]
    for _ in range(100):  # the proxy closed every upstream request: the mock saw each go
        if state.clients_gone == 50:
            break
        await asyncio.sleep(0.05)
    assert (state.clients_gone, state.streams_completed) == (50, 0)


async def test_a_slow_reader_gets_back_pressure_not_a_proxy_that_buffers_the_stream(
    proxy_process, upstream
) -> None:
    proxy = proxy_process(upstream)
    proxy.start()
    pid = proxy.process.pid
    async with aiohttp.ClientSession() as http:  # warm up: tiktoken loaded, pools made
        warm = await stream_message(http, proxy.url, ALICE_KEY)
    assert warm.completed
    peak_before_kib = proc_status_kib(pid, "VmHWM")

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RECEIVE_BUFFER_BYTES)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=SLOW_RECEIVE_BUFFER_BYTES)
    body = json.dumps(
        {
            "model": "claude-haiku-4-5",
            "max_tokens": LARGE_OUTPUT_TOKENS,
            "stream": True,
            "messages": [{"role": "user", "content": "everything"}],
        }
    ).encode()
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: "
        + ALICE_KEY.encode()
        + f"\r\nx-mock-output-tokens: {LARGE_OUTPUT_TOKENS}\r\nx-mock-deltas: 4000\r\n".encode()
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")

    state = upstream.app[MOCK_STATE_KEY]
    sent_bytes, still_s = -1, 0.0
    while still_s < 1.0:  # the client reads nothing: wait until the mock can write no more
        await asyncio.sleep(0.1)
        still_s = still_s + 0.1 if state.stream_bytes_sent == sent_bytes else 0.0
        sent_bytes = state.stream_bytes_sent
    stalled_bytes = sent_bytes
    peak_stalled_kib = proc_status_kib(pid, "VmHWM")
    assert state.streams_completed == 1  # only the warm-up: the large stream is held back

    received = len(head)
    tail = b""
    while chunk := await reader.read(1 << 16):  # now read it all
        received += len(chunk)
        tail = (tail + chunk)[-200:]
    writer.close()
    assert b"event: message_stop" in tail
    assert received > 20_000_000
    assert stalled_bytes < received  # upstream was held back (the rest sat in kernel buffers)
    growth_kib = peak_stalled_kib - peak_before_kib
    assert growth_kib < 8 * 1024, f"proxy peak memory grew by {growth_kib} KiB"
    print(
        f"slow reader: stream {received} bytes; upstream stalled after {stalled_bytes} bytes; "
        f"proxy peak RSS grew {growth_kib} KiB"
    )
    for _ in range(100):
        rows = store_rows(
            proxy.config_path,
            "SELECT status, output_tokens, output_estimated FROM requests ORDER BY created_at_s",
        )
        if rows[-1][0] != "pending":
            break
        await asyncio.sleep(0.1)
    assert rows[-1] == ("posted", LARGE_OUTPUT_TOKENS, 0)


async def test_idle_connections_are_closed_after_the_idle_timeout(proxy_process, upstream) -> None:
    # 3 s: long enough that a loaded CI machine sees all 300 accepted before any is closed
    proxy = proxy_process(upstream, server="idle_timeout_s = 3")
    proxy.start()
    pid = proxy.process.pid
    fds_before = open_fds(pid)
    idle = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(300)]
    for _ in range(50):  # the proxy accepts them from its backlog as its loop gets to them
        if open_fds(pid) >= fds_before + 300:
            break
        await asyncio.sleep(0.02)
    assert open_fds(pid) >= fds_before + 300
    kept_alive_reader, kept_alive_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    kept_alive_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # then stays idle
    assert (await kept_alive_reader.readline()).startswith(b"HTTP/1.1 200")
    async with aiohttp.ClientSession() as http:  # the proxy still serves while they sit there
        served = await stream_message(http, proxy.url, ALICE_KEY)
    assert served.completed

    async def closed_by_the_server(reader: asyncio.StreamReader) -> bool:
        while await reader.read(1 << 16):
            pass
        return True  # EOF: the proxy closed it

    readers = [reader for reader, _ in idle] + [kept_alive_reader]
    closed = await asyncio.wait_for(
        asyncio.gather(*(closed_by_the_server(r) for r in readers)), timeout=20
    )
    assert all(closed) and len(closed) == 301
    for _ in range(100):
        if open_fds(pid) <= fds_before + 5:
            break
        await asyncio.sleep(0.05)
    assert open_fds(pid) <= fds_before + 5  # their sockets are released, not leaked
    for _, writer in idle:
        writer.close()
    kept_alive_writer.close()
