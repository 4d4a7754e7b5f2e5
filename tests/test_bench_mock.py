"""The bench's lean mock (proxy/bench_mock.py) on real sockets: the same answers as the aiohttp
mock, keep-alive, events spaced as scripted, and a clear error for what it does not serve."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from aiohttp import web

from proxy.bench_mock import BenchMock
from proxy.http1 import Client
from proxy.metering import SseMeter, usage_from_body
from proxy.mock_upstream import create_mock_app

KEY = "sk-bench-mock"
CALL = {
    "model": "claude-opus-4-8",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Hello, Claude"}],
}
SCRIPT = {"x-mock-output-tokens": "100", "x-mock-deltas": "20", "x-mock-cache-read-tokens": "7"}


@pytest.fixture
async def lean_url() -> AsyncIterator[str]:
    server = await asyncio.get_running_loop().create_server(lambda: BenchMock(KEY), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


@pytest.fixture
async def aiohttp_url() -> AsyncIterator[str]:
    runner = web.AppRunner(create_mock_app(api_key=KEY))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def ask(
    client: Client, body: dict[str, Any], headers: dict[str, str], key: str = KEY
) -> tuple[int, Mapping[str, str], list[bytes]]:
    """Status, headers and the body's pieces as they arrived."""
    sent = [("x-api-key", key), ("content-type", "application/json"), *headers.items()]
    response = await client.request("POST", "/v1/messages", sent, json.dumps(body).encode())
    try:
        pieces = [chunk async for chunk in response.chunks()]
    finally:
        response.release()
    return response.status, response.headers, pieces


def without_ids(value: Any) -> Any:
    """A body or event with its random message id taken out."""
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def events(body: bytes) -> list[Any]:
    blocks = [block for block in body.decode().split("\n\n") if block.strip()]
    return [without_ids(json.loads(block.split("data: ", 1)[1])) for block in blocks]


def client(url: str) -> Client:
    return Client(url, connections_max=1, connect_timeout_s=5, read_timeout_s=5)


async def test_answers_as_the_aiohttp_mock_does(lean_url: str, aiohttp_url: str) -> None:
    lean, full = client(lean_url), client(aiohttp_url)
    try:
        for stream in (False, True):
            body = {**CALL, "stream": stream}
            lean_status, lean_headers, lean_body = await ask(lean, body, SCRIPT)
            full_status, full_headers, full_body = await ask(full, body, SCRIPT)
            assert lean_status == full_status == 200
            for name in ("content-type", "anthropic-ratelimit-requests-limit"):
                assert lean_headers[name] == full_headers[name]
            assert lean_headers["request-id"].startswith("req_011C")
            if stream:
                assert events(b"".join(lean_body)) == events(b"".join(full_body))
                meter = SseMeter()
                for piece in lean_body:
                    meter.feed(piece)
                assert meter.completed
                assert meter.usage.output_tokens == 100
                assert meter.usage.cache_read_input_tokens == 7
            else:
                lean_message = json.loads(b"".join(lean_body))
                assert without_ids(lean_message) == without_ids(json.loads(b"".join(full_body)))
                assert usage_from_body(b"".join(lean_body)) is not None
        # every answer went out on one connection (keep-alive, streams included)
        assert lean.connections_open == 1
    finally:
        await lean.close()
        await full.close()


async def test_stream_events_come_apart_as_scripted(lean_url: str) -> None:
    lean = client(lean_url)
    try:
        started_s = time.perf_counter()
        script = {"x-mock-output-tokens": "3", "x-mock-deltas": "3", "x-mock-delay-ms": "20"}
        status, _, pieces = await ask(lean, {**CALL, "stream": True}, script)
        elapsed_s = time.perf_counter() - started_s
    finally:
        await lean.close()
    assert status == 200
    assert len(events(b"".join(pieces))) == 9  # 3 opening, 3 deltas, 3 closing
    assert elapsed_s >= 8 * 0.020  # every event after message_start waits its 20 ms
    assert len(pieces) >= 2  # the first event did not wait for the rest


@pytest.mark.parametrize(
    ("headers", "body", "key", "status", "error_type"),
    [
        ({}, CALL, "sk-wrong", 401, "authentication_error"),
        ({"x-mock-fail": "529"}, CALL, KEY, 400, "invalid_request_error"),
        ({}, {"model": "claude-opus-4-8"}, KEY, 400, "invalid_request_error"),
        ({"x-mock-deltas": "many"}, CALL, KEY, 400, "invalid_request_error"),
    ],
)
async def test_what_it_does_not_serve_gets_a_json_error(
    lean_url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    key: str,
    status: int,
    error_type: str,
) -> None:
    lean = client(lean_url)
    try:
        got_status, _, pieces = await ask(lean, body, headers, key=key)
        assert got_status == status
        assert json.loads(b"".join(pieces))["error"]["type"] == error_type
        got_status, _, _ = await ask(lean, CALL, {})  # the connection goes on
        assert got_status == 200 and lean.connections_open == 1
    finally:
        await lean.close()


async def test_other_routes_get_404_and_garbage_gets_400_then_a_close(lean_url: str) -> None:
    host, port = lean_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert json.loads(await reader.readexactly(length))["error"]["type"] == "not_found_error"
    writer.write(b"\x00\x01 not http\r\n\r\n")
    rest = await reader.read()  # to the close
    assert rest.startswith(b"HTTP/1.1 400 ")
    writer.close()
