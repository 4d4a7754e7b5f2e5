"""The mock Messages API on real sockets: shapes, scripted usage, faults, metering its streams."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.metering import SseMeter, Usage, usage_from_body
from proxy.mock_upstream import MOCK_STATE_KEY, WORDS, create_mock_app

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]

HELLO = {
    "model": "claude-opus-4-8",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Hello, Claude"}],
}
HELLO_INPUT_TOKENS = len(b"user" + b"Hello, Claude") // 4  # the strings of messages, / 4
STREAM_EVENTS_DEFAULT = [
    "message_start",
    "content_block_start",
    "ping",
    *["content_block_delta"] * 5,
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def words(count: int) -> str:
    return "".join(WORDS[index % len(WORDS)] for index in range(count))


def sse_events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each complete event of an SSE body."""
    events = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.fixture
async def client(aiohttp_client: ClientFactory) -> TestClient:
    return await aiohttp_client(create_mock_app())


async def read_stream(response: aiohttp.ClientResponse) -> tuple[bytes, SseMeter]:
    """The whole body, also fed chunk by chunk to a meter."""
    meter, body = SseMeter(), bytearray()
    async for chunk in response.content.iter_any():
        meter.feed(chunk)
        body += chunk
    return bytes(body), meter


async def test_non_streaming_message_has_the_api_shape(client: TestClient) -> None:
    response = await client.post("/v1/messages", json=HELLO)

    assert response.status == 200
    assert response.content_type == "application/json"
    assert response.headers["request-id"].startswith("req_")
    assert response.headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert "anthropic-ratelimit-requests-remaining" in response.headers
    body = await response.json()
    assert body["id"].startswith("msg_01")
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == "claude-opus-4-8"
    assert body["content"] == [{"type": "text", "text": words(12)}]
    assert body["stop_reason"] == "end_turn"
    assert body["stop_sequence"] is None
    assert body["usage"] == {
        "input_tokens": HELLO_INPUT_TOKENS,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 12,
        "service_tier": "standard",
    }


async def test_usage_is_deterministic_from_the_request(client: TestClient) -> None:
    request = {**HELLO, "system": "You are terse. " * 40, "model": "claude-sonnet-4-6"}
    first = await (await client.post("/v1/messages", json=request)).json()
    second = await (await client.post("/v1/messages", json=request)).json()
    count = await (await client.post("/v1/messages/count_tokens", json=request)).json()

    assert first["usage"] == second["usage"]
    assert first["usage"]["input_tokens"] == (15 * 40 + 4 + 13) // 4
    assert count == {"input_tokens": first["usage"]["input_tokens"]}
    assert first["id"] != second["id"]


async def test_output_defaults_to_max_tokens_when_smaller(client: TestClient) -> None:
    body = await (await client.post("/v1/messages", json={**HELLO, "max_tokens": 5})).json()

    assert body["usage"]["output_tokens"] == 5
    assert body["stop_reason"] == "max_tokens"
    assert body["content"][0]["text"] == words(5)


async def test_stream_emits_the_real_event_sequence(client: TestClient) -> None:
    response = await client.post("/v1/messages", json={**HELLO, "stream": True})
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"].startswith("req_")
    data, meter = await read_stream(response)
    events = sse_events(data)

    assert [name for name, _ in events] == STREAM_EVENTS_DEFAULT
    assert all(payload["type"] == name for name, payload in events)
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_01")
    assert start["model"] == "claude-opus-4-8"
    assert start["content"] == []
    assert start["usage"]["output_tokens"] == 1
    assert start["usage"]["input_tokens"] == HELLO_INPUT_TOKENS
    assert [len(p["delta"]["text"].split()) for n, p in events if n == "content_block_delta"] == [
        3,
        3,
        2,
        2,
        2,
    ]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 12
    assert meter.completed and meter.error_type is None
    assert meter.relayed_text() == words(12)
    assert meter.usage == Usage(input_tokens=HELLO_INPUT_TOKENS, output_tokens=12)
    assert client.app[MOCK_STATE_KEY].streams_completed == 1


SCRIPTED_HEADERS = {
    "x-mock-input-tokens": "1000",
    "x-mock-output-tokens": "321",
    "x-mock-cache-read-tokens": "5000",
    "x-mock-cache-write-tokens": "700",
    "x-mock-cache-write-1h-tokens": "300",
    "x-mock-web-searches": "2",
    "x-mock-speed": "fast",
}
SCRIPTED_USAGE = Usage(
    input_tokens=1000,
    output_tokens=321,
    cache_creation_5m_input_tokens=700,
    cache_creation_1h_input_tokens=300,
    cache_read_input_tokens=5000,
    web_search_requests=2,
    speed="fast",
)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, Usage(input_tokens=HELLO_INPUT_TOKENS, output_tokens=12)),
        (SCRIPTED_HEADERS, SCRIPTED_USAGE),
        (
            {"x-mock-cache-write-tokens": "64", "x-mock-output-tokens": "0"},
            Usage(input_tokens=HELLO_INPUT_TOKENS, cache_creation_5m_input_tokens=64),
        ),
        (
            {"x-mock-input-tokens": "250000", "x-mock-output-tokens": "2000"},
            Usage(input_tokens=250000, output_tokens=1024),  # like the API: capped at max_tokens
        ),
    ],
    ids=["default", "all-scripted", "cache-write-no-output", "long-context"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_scripted_usage_is_metered_as_scripted(
    client: TestClient, headers: dict[str, str], expected: Usage, stream: bool
) -> None:
    response = await client.post("/v1/messages", json={**HELLO, "stream": stream}, headers=headers)
    assert response.status == 200

    if stream:
        _, meter = await read_stream(response)
        assert meter.completed
        assert meter.usage == expected
    else:
        assert usage_from_body(await response.read()) == expected


async def test_scripted_usage_has_the_wire_shape(client: TestClient) -> None:
    body = await (await client.post("/v1/messages", json=HELLO, headers=SCRIPTED_HEADERS)).json()

    assert body["usage"] == {
        "input_tokens": 1000,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 5000,
        "cache_creation": {"ephemeral_5m_input_tokens": 700, "ephemeral_1h_input_tokens": 300},
        "output_tokens": 321,
        "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0},
        "service_tier": "standard",
        "speed": "fast",
    }


@pytest.mark.parametrize(
    ("deltas", "output_tokens", "expected_deltas"),
    [("3", "12", 3), ("1", "12", 1), ("0", "12", 0), ("8", "4", 4), ("5", "0", 0)],
)
async def test_stream_delta_count_is_scriptable(
    client: TestClient, deltas: str, output_tokens: str, expected_deltas: int
) -> None:
    headers = {"x-mock-deltas": deltas, "x-mock-output-tokens": output_tokens}
    response = await client.post("/v1/messages", json={**HELLO, "stream": True}, headers=headers)
    data, meter = await read_stream(response)

    names = [name for name, _ in sse_events(data)]
    assert names.count("content_block_delta") == expected_deltas
    assert names[-1] == "message_stop"
    assert meter.usage.output_tokens == int(output_tokens)
    assert meter.relayed_text() == (words(int(output_tokens)) if expected_deltas else "")


async def test_stream_events_arrive_one_by_one_after_their_delay(client: TestClient) -> None:
    headers = {"x-mock-delay-ms": "30"}
    started_s = time.monotonic()
    response = await client.post("/v1/messages", json={**HELLO, "stream": True}, headers=headers)
    chunks = []
    async for chunk in response.content.iter_any():
        chunks.append((time.monotonic() - started_s, chunk))
    elapsed_s = time.monotonic() - started_s

    assert len(chunks) >= len(STREAM_EVENTS_DEFAULT)  # nothing was coalesced
    assert chunks[0][1].startswith(b"event: message_start\n")
    assert chunks[0][0] < 0.25  # message_start is not delayed
    assert elapsed_s >= 0.03 * (len(STREAM_EVENTS_DEFAULT) - 1)


async def test_non_streaming_answer_waits_for_its_delay(client: TestClient) -> None:
    started_s = time.monotonic()
    response = await client.post("/v1/messages", json=HELLO, headers={"x-mock-delay-ms": "200"})

    assert response.status == 200
    assert time.monotonic() - started_s >= 0.2


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_fast_mode_ignores_delays(aiohttp_client: ClientFactory, stream: bool) -> None:
    fast_client = await aiohttp_client(create_mock_app(fast=True))
    started_s = time.monotonic()

    response = await fast_client.post(
        "/v1/messages", json={**HELLO, "stream": stream}, headers={"x-mock-delay-ms": "2000"}
    )
    await response.read()

    assert response.status == 200
    assert time.monotonic() - started_s < 1.0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("fail", "status", "error_type"),
    [("529", 529, "overloaded_error"), ("500", 500, "api_error")],
)
async def test_http_failures(
    client: TestClient, fail: str, status: int, error_type: str, stream: bool
) -> None:
    response = await client.post(
        "/v1/messages", json={**HELLO, "stream": stream}, headers={"x-mock-fail": fail}
    )

    assert response.status == status
    assert response.headers["request-id"].startswith("req_")
    assert response.headers["anthropic-ratelimit-requests-limit"] == "4000"
    body = await response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    if fail == "529":
        assert response.headers["retry-after"] == "1"


async def test_error_event_without_stream_is_overloaded(client: TestClient) -> None:
    response = await client.post("/v1/messages", json=HELLO, headers={"x-mock-fail": "error-event"})

    assert response.status == 529
    assert (await response.json())["error"]["type"] == "overloaded_error"


async def test_cut_stream_ends_without_message_stop(client: TestClient) -> None:
    response = await client.post(
        "/v1/messages", json={**HELLO, "stream": True}, headers={"x-mock-fail": "cut-stream"}
    )
    data, meter = await read_stream(response)

    names = [name for name, _ in sse_events(data)]
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * 3]
    assert meter.saw_message_start and not meter.completed and meter.error_type is None
    assert meter.usage == Usage(input_tokens=HELLO_INPUT_TOKENS, output_tokens=1)
    assert meter.relayed_text() == words(8)  # deltas of 3, 3 and 2 words


async def test_error_event_after_half_the_deltas(client: TestClient) -> None:
    response = await client.post(
        "/v1/messages", json={**HELLO, "stream": True}, headers={"x-mock-fail": "error-event"}
    )
    assert response.status == 200
    data, meter = await read_stream(response)

    events = sse_events(data)
    assert [name for name, _ in events][-4:] == ["content_block_delta"] * 3 + ["error"]
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert meter.error_type == "overloaded_error"
    assert not meter.completed
    assert meter.relayed_text() == words(8)


async def test_reset_aborts_the_stream_midway(client: TestClient) -> None:
    response = await client.post(
        "/v1/messages", json={**HELLO, "stream": True}, headers={"x-mock-fail": "reset"}
    )
    meter = SseMeter()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            meter.feed(chunk)

    assert meter.saw_message_start and not meter.completed
    assert meter.relayed_text() == words(8)


@pytest.mark.parametrize("fail", ["reset", "cut-stream"])
async def test_non_streaming_reset_and_cut_break_the_response(
    client: TestClient, fail: str
) -> None:
    with pytest.raises(aiohttp.ClientError):
        response = await client.post("/v1/messages", json=HELLO, headers={"x-mock-fail": fail})
        await response.read()


async def wait_for_client_gone(client: TestClient, count: int) -> None:
    for _ in range(100):
        if client.app[MOCK_STATE_KEY].clients_gone >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the mock never noticed that the client went away")


async def test_stall_hangs_until_the_client_goes_away(client: TestClient) -> None:
    response = await client.post(
        "/v1/messages", json={**HELLO, "stream": True}, headers={"x-mock-fail": "stall"}
    )
    meter = SseMeter()
    while meter.relayed_text() != words(8):
        meter.feed(await asyncio.wait_for(response.content.readany(), timeout=2))

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(response.content.readany(), timeout=0.3)
    response.close()

    await wait_for_client_gone(client, 1)
    assert not meter.completed


async def test_non_streaming_stall_hangs_until_the_client_goes_away(client: TestClient) -> None:
    with pytest.raises(TimeoutError):
        await client.post(
            "/v1/messages",
            json=HELLO,
            headers={"x-mock-fail": "stall"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )

    await wait_for_client_gone(client, 1)


async def test_client_gone_mid_stream_is_counted(client: TestClient) -> None:
    response = await client.post(
        "/v1/messages", json={**HELLO, "stream": True}, headers={"x-mock-delay-ms": "50"}
    )
    await response.content.readany()
    response.close()

    await wait_for_client_gone(client, 1)
    assert client.app[MOCK_STATE_KEY].streams_completed == 0


@pytest.mark.parametrize(
    ("headers", "body", "named"),
    [
        ({"x-mock-output-tokens": "many"}, HELLO, "x-mock-output-tokens"),
        ({"x-mock-delay-ms": "-1"}, HELLO, "x-mock-delay-ms"),
        ({"x-mock-fail": "sometimes"}, HELLO, "x-mock-fail"),
        ({"x-mock-speed": "ludicrous"}, HELLO, "x-mock-speed"),
        ({}, {"max_tokens": 10, "messages": []}, "model"),
        ({}, {"model": "claude-opus-4-8", "messages": []}, "max_tokens"),
        ({}, [1, 2], "JSON object"),
    ],
)
async def test_malformed_requests_are_400(
    client: TestClient, headers: dict[str, str], body: Any, named: str
) -> None:
    response = await client.post("/v1/messages", json=body, headers=headers)

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert named in error["message"]


async def test_body_that_is_not_json_is_400(client: TestClient) -> None:
    response = await client.post("/v1/messages", data=b"{nope")

    assert response.status == 400
    assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_count_tokens(client: TestClient) -> None:
    request = {"model": "claude-opus-4-8", "messages": HELLO["messages"]}
    plain = await client.post("/v1/messages/count_tokens", json=request)
    scripted = await client.post(
        "/v1/messages/count_tokens", json=request, headers={"x-mock-input-tokens": "777"}
    )
    failing = await client.post(
        "/v1/messages/count_tokens", json=request, headers={"x-mock-fail": "529"}
    )

    assert (plain.status, await plain.json()) == (200, {"input_tokens": HELLO_INPUT_TOKENS})
    assert await scripted.json() == {"input_tokens": 777}
    assert failing.status == 529
    assert client.app[MOCK_STATE_KEY].messages_total == 0  # count_tokens is not a message


async def test_models_list(client: TestClient) -> None:
    response = await client.get("/v1/models")
    page = await response.json()

    assert response.status == 200
    ids = [model["id"] for model in page["data"]]
    assert "claude-opus-4-8" in ids
    assert all(set(model) == {"type", "id", "display_name", "created_at"} for model in page["data"])
    assert all(model["type"] == "model" for model in page["data"])
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[0], ids[-1], False)


async def test_models_pages(client: TestClient) -> None:
    everything = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]

    first = await (await client.get("/v1/models", params={"limit": "2"})).json()
    after = await (
        await client.get("/v1/models", params={"limit": "2", "after_id": first["last_id"]})
    ).json()
    before = await (
        await client.get("/v1/models", params={"limit": "2", "before_id": after["first_id"]})
    ).json()
    bad = await client.get("/v1/models", params={"limit": "0"})

    assert [m["id"] for m in first["data"]] == everything[:2]
    assert first["has_more"] is True
    assert [m["id"] for m in after["data"]] == everything[2:4]
    assert [m["id"] for m in before["data"]] == everything[:2]
    assert bad.status == 400


async def test_model_by_id(client: TestClient) -> None:
    found = await client.get("/v1/models/claude-opus-4-8")
    missing = await client.get("/v1/models/claude-nonexistent")

    assert (await found.json())["display_name"] == "Claude Opus 4.8"
    assert missing.status == 404
    assert (await missing.json())["error"]["type"] == "not_found_error"


async def test_other_v1_paths_echo_the_request(client: TestClient) -> None:
    body = bytes(range(256)) * 4
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "files-api-2025-04-14,context-1m-2025-08-07",
        "x-stainless-lang": "python",
        "User-Agent": "claude-cli/2.1.0 (external, cli)",
        "content-type": "application/octet-stream",
    }

    response = await client.put(
        "/v1/files/file_011C%2Fabc?beta=true&tag=a%20b", data=body, headers=headers
    )
    echo = await response.json()

    assert response.status == 200
    assert response.headers["request-id"].startswith("req_")
    assert echo["method"] == "PUT"
    assert echo["path"] == "/v1/files/file_011C%2Fabc"
    assert echo["query_string"] == "beta=true&tag=a%20b"
    assert base64.b64decode(echo["body_b64"]) == body
    for name, value in headers.items():
        assert echo["headers"][name.lower()] == value


async def test_echo_answers_any_method(client: TestClient) -> None:
    for method in ("GET", "DELETE", "PATCH", "POST"):
        response = await client.request(method, "/v1/messages/batches/msgbatch_01")
        assert (await response.json())["method"] == method


async def test_paths_outside_v1_are_not_found(client: TestClient) -> None:
    response = await client.get("/healthz")

    assert response.status == 404
    assert (await response.json())["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("path", "method", "body"),
    [
        ("/v1/messages", "POST", HELLO),
        ("/v1/messages/count_tokens", "POST", HELLO),
        ("/v1/models", "GET", None),
        ("/v1/files", "GET", None),
    ],
)
async def test_api_key_is_checked_when_set(
    aiohttp_client: ClientFactory, path: str, method: str, body: Any
) -> None:
    keyed = await aiohttp_client(create_mock_app(api_key="sk-ant-upstream"))

    async def send(headers: dict[str, str]) -> aiohttp.ClientResponse:
        return await keyed.request(method, path, json=body, headers=headers)

    refused = [
        await send({"x-api-key": "sk-member"}),
        await send({}),
        await send({"authorization": "Bearer sk-member"}),
        await send({"x-api-key": "sk-member", "authorization": "Bearer sk-ant-upstream"}),
    ]
    accepted = [
        await send({"x-api-key": "sk-ant-upstream"}),
        await send({"authorization": "Bearer sk-ant-upstream"}),  # how newer SDKs send keys
    ]

    for response in refused:
        assert response.status == 401
        assert (await response.json())["error"]["type"] == "authentication_error"
        assert response.headers["request-id"].startswith("req_")
    assert [response.status for response in accepted] == [200, 200]
    assert keyed.app[MOCK_STATE_KEY].messages_total == (2 if path == "/v1/messages" else 0)


async def test_state_records_recent_requests(client: TestClient) -> None:
    await client.post("/v1/messages?beta=true", data=json.dumps(HELLO).encode())

    state = client.app[MOCK_STATE_KEY]
    assert (state.requests_total, state.messages_total) == (1, 1)
    recorded = state.recent[-1]
    assert (recorded.method, recorded.path_qs) == ("POST", "/v1/messages?beta=true")
    assert recorded.body == json.dumps(HELLO).encode()
