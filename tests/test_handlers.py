"""The proxy over real sockets against the mock upstream: pass-through fidelity and bad input."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from proxy.appkeys import STORE
from proxy.exchange import new_request_id
from tests.conftest import ALICE_KEY, REVOKED_KEY, UPSTREAM_KEY, settled

pytestmark = pytest.mark.both_stores  # every test here on both stores

MESSAGE = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "Hello there"}],
}


async def post_message(
    proxy: TestServer,
    body: object = MESSAGE,
    *,
    key: str = ALICE_KEY,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
):
    async with ClientSession() as http:
        response = await http.post(
            proxy.make_url("/v1/messages"),
            data=raw if raw is not None else json.dumps(body).encode(),
            headers={"x-api-key": key, "content-type": "application/json", **(headers or {})},
        )
        return response.status, dict(response.headers), await response.read()


def error_of(payload: bytes) -> dict:
    body = json.loads(payload)
    assert body["type"] == "error"
    return body["error"]


async def test_head_root_answers_200(proxy: TestServer) -> None:
    async with ClientSession() as http, http.head(proxy.make_url("/")) as response:
        assert response.status == 200


async def test_other_v1_paths_are_forwarded_faithfully(proxy: TestServer) -> None:
    body = b'{"any": "bytes", "kept":   "as sent"}'
    async with (
        ClientSession() as http,
        http.put(
            proxy.make_url("/v1/files/abc?beta=true&x=1"),
            data=body,
            headers={
                "authorization": f"Bearer {ALICE_KEY}",
                "anthropic-version": "2023-06-01",
                "anthropic-beta": "files-api-2025-04-14",
                "x-app": "cli",
                "x-stainless-lang": "js",
                "user-agent": "claude-cli/2.1.0",
            },
        ) as response,
    ):
        assert response.status == 200
        echo = await response.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/v1/files/abc"
    assert echo["query_string"] == "beta=true&x=1"
    assert base64.b64decode(echo["body_b64"]) == body
    sent = {k.lower(): v for k, v in echo["headers"].items()}
    assert sent["anthropic-version"] == "2023-06-01"
    assert sent["anthropic-beta"] == "files-api-2025-04-14"
    assert sent["x-app"] == "cli" and sent["x-stainless-lang"] == "js"
    assert sent["user-agent"] == "claude-cli/2.1.0"
    # the member's key is replaced by the upstream key, and never forwarded
    assert sent["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in sent
    assert "x-extra-usage" not in sent  # the proxy's own header stays here
    assert ALICE_KEY not in json.dumps(echo)


async def test_count_tokens_is_forwarded_and_not_metered(proxy: TestServer) -> None:
    async with (
        ClientSession() as http,
        http.post(
            proxy.make_url("/v1/messages/count_tokens"),
            json=MESSAGE,
            headers={"x-api-key": ALICE_KEY},
        ) as response,
    ):
        assert response.status == 200
        assert (await response.json())["input_tokens"] > 0
        assert "x-usage-cost" not in response.headers
    store = proxy.app[STORE]
    assert await store.recent_requests(10) == []


async def test_models_list_passes_through(proxy: TestServer) -> None:
    async with (
        ClientSession() as http,
        http.get(proxy.make_url("/v1/models"), headers={"x-api-key": ALICE_KEY}) as response,
    ):
        assert response.status == 200
        ids = [m["id"] for m in (await response.json())["data"]]
    assert "claude-opus-4-8" in ids


async def test_upstream_ratelimit_headers_are_dropped_by_default(proxy: TestServer) -> None:
    status, headers, _ = await post_message(proxy)
    assert status == 200
    assert "request-id" in {k.lower() for k in headers}
    assert not [k for k in headers if k.lower().startswith("anthropic-ratelimit-")]


async def test_upstream_ratelimit_headers_kept_when_configured(start_proxy) -> None:
    proxy = await start_proxy(upstream="forward_ratelimit_headers = true")
    status, headers, _ = await post_message(proxy)
    assert status == 200
    assert [k for k in headers if k.lower().startswith("anthropic-ratelimit-")]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"max_tokens": 5, "messages": []}).encode(), "model"),
        (json.dumps({"model": "claude-sonnet-4-5", "messages": []}).encode(), "max_tokens"),
        # read by the stdlib, not as orjson's float: the limit is named
        (
            b'{"model": "claude-sonnet-4-5", "max_tokens": 123456789012345678901234567890}',
            "at most",
        ),
        (b'{"model": "claude-sonnet-4-5", "max_tokens": 1e400}', "positive integer"),
        (b"\xff", "not valid JSON"),
    ],
)
async def test_malformed_requests_get_400(proxy: TestServer, raw: bytes, fragment: str) -> None:
    status, headers, payload = await post_message(proxy, raw=raw)
    assert status == 400
    error = error_of(payload)
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    assert headers["request-id"].startswith("req_proxy_")


def test_request_ids_sort_by_the_millisecond_they_were_made() -> None:
    """Later ids sort later (stores append them at their index's edge); ids of one millisecond
    differ by 80 random bits."""
    same_ms = {new_request_id(1_796_000_000_000) for _ in range(1000)}
    assert len(same_ms) == 1000
    assert all(len(i) == len("req_proxy_") + 32 and i.startswith("req_proxy_") for i in same_ms)
    assert max(same_ms) < new_request_id(1_796_000_000_001) < new_request_id(1_796_000_000_256)


async def test_the_proxy_gives_later_requests_later_ids(proxy: TestServer) -> None:
    await post_message(proxy, MESSAGE)
    await asyncio.sleep(0.002)
    await post_message(proxy, MESSAGE)
    newer, older = await settled(proxy, 2)  # newest first, by the time each was admitted
    assert older.request_id < newer.request_id


async def test_unknown_model_is_refused_naming_it_and_not_forwarded(proxy: TestServer) -> None:
    status, _, payload = await post_message(proxy, {**MESSAGE, "model": "claude-nonexistent-9"})
    assert status == 400
    error = error_of(payload)
    assert error["type"] == "invalid_request_error"
    assert "claude-nonexistent-9" in error["message"]
    assert await proxy.app[STORE].recent_requests(10) == []


@pytest.mark.parametrize("key", ["", "sk-wrong-key-000000000000000", REVOKED_KEY])
async def test_missing_wrong_or_revoked_key_gets_401(proxy: TestServer, key: str, clock) -> None:
    await proxy.app[STORE].revoke_key(REVOKED_KEY[:12], clock.now_s())
    status, headers, payload = await post_message(proxy, key=key)
    assert status == 401
    assert error_of(payload)["type"] == "authentication_error"
    assert headers["x-should-retry"] == "false"  # else Claude Code retries a bad key for 3 min


async def test_body_over_the_limit_gets_413(start_proxy) -> None:
    proxy = await start_proxy(server="max_body_mb = 0.01")
    big = {**MESSAGE, "messages": [{"role": "user", "content": "x" * 20_000}]}
    status, _, payload = await post_message(proxy, big)
    assert status == 413
    assert error_of(payload)["type"] == "request_too_large"


async def test_upstream_unreachable_is_502(start_proxy) -> None:
    proxy = await start_proxy(upstream_url="http://127.0.0.1:9")
    status, _, payload = await post_message(proxy)
    assert status == 502
    assert error_of(payload)["type"] == "api_error"
    [record] = await settled(proxy)
    assert record.status == "voided" and record.cost_nanos == 0


async def test_upstream_timeout_is_504(start_proxy) -> None:
    proxy = await start_proxy(upstream="timeout_s = 0.3")
    status, _, payload = await post_message(proxy, headers={"x-mock-delay-ms": "2000"})
    assert status == 504
    assert error_of(payload)["type"] == "api_error"


@pytest.mark.parametrize(
    ("fail", "status", "error_type"), [("529", 529, "overloaded_error"), ("500", 500, "api_error")]
)
async def test_upstream_errors_are_relayed_unchanged_and_cost_nothing(
    proxy: TestServer, fail: str, status: int, error_type: str
) -> None:
    got, headers, payload = await post_message(proxy, headers={"x-mock-fail": fail})
    assert got == status
    assert error_of(payload)["type"] == error_type
    assert headers["request-id"].startswith("req_")
    [record] = await settled(proxy)
    assert record.status == "voided" and record.cost_nanos == 0
    assert record.upstream_status == status


async def test_canonical_log_line_has_the_request_and_no_secrets(proxy: TestServer) -> None:
    with capture_logs() as logs:
        status, _, _ = await post_message(proxy, headers={"x-mock-output-tokens": "10"})
    assert status == 200
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["member"] == "alice@acme.test"
    assert line["model"] == "claude-sonnet-4-5"
    assert line["output_tokens"] == 10
    assert line["outcome"] == "ok"
    assert line["billing"] == "included"
    assert "cost_usd" in line and "duration_ms" in line
    text = json.dumps(logs, default=str)
    assert ALICE_KEY not in text and UPSTREAM_KEY not in text and "Hello there" not in text


async def test_upstream_4xx_is_relayed_unchanged_and_costs_nothing(start_proxy, config) -> None:
    """A proxy holding a wrong upstream key: upstream's 401 comes back as it was sent."""
    proxy = await start_proxy(upstream='api_key_env = "NO_SUCH_VARIABLE_FOR_THE_KEY"')
    status, headers, payload = await post_message(proxy)
    assert status == 401
    assert error_of(payload)["type"] == "authentication_error"
    assert headers["request-id"].startswith("req_0")  # upstream's own request id
    [record] = await settled(proxy)
    assert record.status == "voided" and record.cost_nanos == 0 and record.upstream_status == 401


async def test_a_large_prompt_is_estimated_and_reserved(proxy: TestServer) -> None:
    """~50,000 tokens of prompt (estimated off the event loop) are in the worst case reserved."""
    big = {**MESSAGE, "messages": [{"role": "user", "content": "hello world " * 25_000}]}
    status, _, _ = await post_message(proxy, big)
    assert status == 200
    [record] = await settled(proxy)
    worst_output_nanos = 256 * 15_000
    assert record.reserved_nanos - worst_output_nanos >= 50_000 * 3_000


@pytest.mark.parametrize("depth", [5_000, 900])
async def test_deeply_nested_json_is_a_400_not_a_500(proxy: TestServer, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    raw = (
        '{"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", '
        f'"content": {nested}}}]}}'
    ).encode()
    status, _, payload = await post_message(proxy, raw=raw)
    assert status in (200, 400), payload
    if status == 400:
        assert error_of(payload)["type"] == "invalid_request_error"


async def raw_stream(proxy: TestServer, version: str) -> tuple[bytes, bytes]:
    """A streamed message asked for over a bare socket: the response head and the raw body."""
    body = json.dumps({**MESSAGE, "stream": True}).encode()
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        f"POST /v1/messages HTTP/{version}\r\nHost: {proxy.host}\r\nx-api-key: {ALICE_KEY}\r\n"
        f"Content-Type: application/json\r\nx-mock-deltas: 5\r\nx-mock-delay-ms: 5\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    answer = await asyncio.wait_for(reader.read(), 10)  # to the end: the proxy closes
    writer.close()
    head, _, raw_body = answer.partition(b"\r\n\r\n")
    return head, raw_body


def unchunked(raw: bytes) -> list[bytes]:
    """The chunks of a chunked body, checking its framing to the terminating chunk."""
    chunks = []
    while True:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line, 16)
        chunk, crlf, raw = raw[:size], raw[size : size + 2], raw[size + 2 :]
        assert crlf == b"\r\n", "a chunk must end where its size says"
        if size == 0:
            assert raw == b""
            return chunks
        chunks.append(chunk)


async def test_a_stream_is_framed_chunk_by_chunk_over_http_1_1(proxy: TestServer) -> None:
    head, raw_body = await raw_stream(proxy, "1.1")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    chunks = unchunked(raw_body)
    assert len(chunks) > 5  # relayed as they came, one chunk each
    events = b"".join(chunks)
    assert events.startswith(b"event: message_start\n")
    assert events.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    [record] = await settled(proxy)
    assert (record.outcome, record.usage.output_estimated) == ("ok", False)


async def test_an_http_1_0_client_gets_the_stream_unframed_to_the_close(proxy: TestServer) -> None:
    head, raw_body = await raw_stream(proxy, "1.0")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert raw_body.startswith(b"event: message_start\n")
    assert raw_body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert raw_body.count(b"event: content_block_delta\n") == 5
    [record] = await settled(proxy)
    assert (record.outcome, record.usage.output_estimated) == ("ok", False)
