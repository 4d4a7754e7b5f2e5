"""Upstream faults, scripted with the mock's `x-mock-fail`: the client gets the API's own error or
an Anthropic-shaped one, the charge follows SPEC §8, and the next request works."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.mock_upstream import MALFORMED_SSE
from tests.conftest import ALICE_KEY, settled
from tests.reliability.conftest import free_port, stream_message

pytestmark = pytest.mark.both_stores
MODEL = "claude-haiku-4-5"
SCRIPT = {"x-mock-output-tokens": "40", "x-mock-deltas": "8", "x-mock-delay-ms": "20"}


async def message(proxy: TestServer, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    body = {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.make_url("/v1/messages"), json=body, headers={"x-api-key": ALICE_KEY, **headers}
        ) as response,
    ):
        headers = {name.lower(): value for name, value in response.headers.items()}
        return response.status, headers, await response.read()


async def still_serving(proxy: TestServer) -> None:
    """The fault left nothing behind: the next request streams and is posted as metered."""
    async with aiohttp.ClientSession() as http:
        result = await stream_message(
            http, str(proxy.make_url("")).rstrip("/"), ALICE_KEY, headers=SCRIPT
        )
    assert result.status == 200 and result.completed
    [record] = await settled(proxy)
    assert record.status == "posted" and record.usage.output_tokens == 40
    assert not record.usage.output_estimated


def anthropic_error(payload: bytes) -> dict:
    body = json.loads(payload)
    assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}
    return body["error"]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    ("fail", "retry_after", "status", "error_type"),
    [
        ("529", "30", 529, "overloaded_error"),
        ("500", "7", 500, "api_error"),
        ("529", None, 529, "overloaded_error"),
    ],
)
async def test_upstream_5xx_with_retry_after_is_relayed_and_free(
    start_proxy, stream: bool, fail: str, retry_after: str | None, status: int, error_type: str
) -> None:
    proxy = await start_proxy()
    headers = {"x-mock-fail": fail}
    if retry_after is not None:
        headers["x-mock-retry-after"] = retry_after
    if stream:
        async with aiohttp.ClientSession() as http:
            got = await stream_message(
                http, str(proxy.make_url("")).rstrip("/"), ALICE_KEY, headers=headers
            )
        code, response_headers, payload = got.status, got.headers, got.body
    else:
        code, response_headers, payload = await message(proxy, headers)
    assert code == status
    assert anthropic_error(payload)["type"] == error_type
    assert json.loads(payload)["request_id"] == response_headers["request-id"]  # upstream's own
    assert response_headers.get("retry-after") == (retry_after or ("1" if fail == "529" else None))
    [record] = await settled(proxy)
    assert (record.status, record.cost_nanos, record.upstream_status) == ("voided", 0, status)
    await still_serving(proxy)


@pytest.mark.parametrize("stream", [True, False])
async def test_timeout_before_the_response_head_is_a_504_and_free(start_proxy, stream) -> None:
    proxy = await start_proxy(upstream="timeout_s = 0.5")
    if stream:
        async with aiohttp.ClientSession() as http:
            got = await stream_message(
                http,
                str(proxy.make_url("")).rstrip("/"),
                ALICE_KEY,
                headers={"x-mock-fail": "hang"},
            )
        code, payload = got.status, got.body
    else:
        code, _, payload = await message(proxy, {"x-mock-fail": "hang"})
    assert code == 504
    assert anthropic_error(payload)["type"] == "api_error"
    [record] = await settled(proxy)
    assert (record.status, record.cost_nanos, record.outcome) == ("voided", 0, "upstream_timeout")
    await still_serving(proxy)


async def test_connection_refused_is_a_502_and_free_and_the_proxy_stays_up(start_proxy) -> None:
    proxy = await start_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")  # nobody listens
    for _ in range(3):
        code, headers, payload = await message(proxy, {})
        assert code == 502 and headers.get("x-should-retry") != "false"  # a retry may help
        assert "could not be reached" in anthropic_error(payload)["message"]
    records = await settled(proxy, 3)
    assert {(r.status, r.cost_nanos, r.outcome) for r in records} == {
        ("voided", 0, "upstream_unreachable")
    }
    async with aiohttp.ClientSession() as http, http.get(proxy.make_url("/healthz")) as health:
        assert health.status == 200


@pytest.mark.parametrize(
    ("fail", "outcome", "upstream_lines"),
    [
        ("stall", "upstream_cut", "timeout_s = 0.5"),  # no byte for timeout_s: the idle timeout
        ("reset", "upstream_cut", ""),
        ("cut-stream", "upstream_cut", ""),
        ("error-event", "upstream_error_event", ""),
    ],
)
async def test_a_stream_broken_mid_way_is_charged_for_what_was_used(
    start_proxy, fail: str, outcome: str, upstream_lines: str
) -> None:
    proxy = await start_proxy(upstream=upstream_lines)
    async with aiohttp.ClientSession() as http:
        got = await stream_message(
            http,
            str(proxy.make_url("")).rstrip("/"),
            ALICE_KEY,
            headers={**SCRIPT, "x-mock-fail": fail},
        )
    assert got.status == 200 and not got.completed
    assert b"event: message_start" in got.body
    if fail == "error-event":  # the event reaches the client as sent, and the stream ends
        assert b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"' in got.body
        assert got.error is None
    else:  # the client sees the stream break, as upstream broke it
        assert got.error is not None
    [record] = await settled(proxy)
    assert record.status == "posted" and record.outcome == outcome
    assert record.usage.input_tokens > 0  # from message_start
    assert record.usage.output_estimated and 0 < record.usage.output_tokens < 40  # half relayed
    assert record.cost_nanos > 0
    await still_serving(proxy)


async def test_malformed_sse_is_relayed_byte_for_byte_and_metered_from_the_real_events(
    start_proxy,
) -> None:
    proxy = await start_proxy()
    async with aiohttp.ClientSession() as http:
        got = await stream_message(
            http,
            str(proxy.make_url("")).rstrip("/"),
            ALICE_KEY,
            headers={**SCRIPT, "x-mock-fail": "malformed-sse"},
        )
    assert got.status == 200 and got.completed
    assert MALFORMED_SSE in got.body  # never "repaired" or dropped
    [record] = await settled(proxy)
    assert record.status == "posted" and record.outcome == "ok"
    assert record.usage.output_tokens == 40 and not record.usage.output_estimated
    await still_serving(proxy)
