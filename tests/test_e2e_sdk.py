"""End to end with the official `anthropic` SDK through the proxy to the mock upstream."""

from __future__ import annotations

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ALICE_KEY, settled

pytestmark = pytest.mark.both_stores  # every test here on both stores

# A scripted usage and its cost at the seed table's Sonnet 4.5 prices, computed by hand:
# 1000 input x $3 + 200 output x $15 + 5000 cache read x $0.30 + 300 5m write x $3.75
# + 100 1h write x $6 (per MTok) = 3,000,000 + 3,000,000 + 1,500,000 + 1,125,000 + 600,000 nanos.
SCRIPTED_USAGE = {
    "x-mock-input-tokens": "1000",
    "x-mock-output-tokens": "200",
    "x-mock-cache-read-tokens": "5000",
    "x-mock-cache-write-tokens": "300",
    "x-mock-cache-write-1h-tokens": "100",
}
SCRIPTED_COST_NANOS = 9_225_000
PROMPT = [{"role": "user", "content": "Write a haiku about metering."}]


def sdk(proxy: TestServer, key: str = ALICE_KEY, **headers: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=str(proxy.make_url("")).rstrip("/"),
        api_key=key,
        max_retries=0,
        default_headers=headers or None,
    )


async def test_non_streaming_cost_header_and_record_match_the_seed_prices(proxy) -> None:
    client = sdk(proxy, **SCRIPTED_USAGE)
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=1024, messages=PROMPT
    )
    message = await raw.parse()
    assert message.usage.output_tokens == 200
    assert raw.headers["x-usage-cost"] == "0.009225"
    [record] = await settled(proxy)
    assert record.status == "posted"
    assert record.cost_nanos == SCRIPTED_COST_NANOS
    assert record.usage.input_tokens == 1000
    assert record.usage.cache_creation_5m_input_tokens == 300
    assert record.usage.cache_creation_1h_input_tokens == 100
    assert record.usage.cache_read_input_tokens == 5000
    assert not record.usage.output_estimated
    assert record.model == "claude-sonnet-4-5" and not record.stream


async def test_streaming_record_matches_the_seed_prices(proxy) -> None:
    client = sdk(proxy, **SCRIPTED_USAGE)
    async with client.messages.stream(
        model="claude-sonnet-4-5-20250929", max_tokens=1024, messages=PROMPT
    ) as stream:
        text = "".join([chunk async for chunk in stream.text_stream])
        final = await stream.get_final_message()
    assert text
    assert final.usage.output_tokens == 200
    [record] = await settled(proxy)
    assert record.status == "posted" and record.stream
    assert record.cost_nanos == SCRIPTED_COST_NANOS
    assert record.outcome == "ok"


async def test_claude_code_default_model_works_out_of_the_box(proxy) -> None:
    message = await sdk(proxy).messages.create(
        model="claude-opus-4-8", max_tokens=64, messages=PROMPT
    )
    assert message.model == "claude-opus-4-8"
    [record] = await settled(proxy)
    # $5 / $25 per MTok
    assert (
        record.cost_nanos == record.usage.input_tokens * 5000 + record.usage.output_tokens * 25000
    )
    assert record.cost_nanos > 0


async def test_stream_is_relayed_chunk_by_chunk(proxy) -> None:
    """The first event reaches the client while upstream is still holding back the rest."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.make_url("/v1/messages"),
            json={
                "model": "claude-haiku-4-5",
                "max_tokens": 100,
                "stream": True,
                "messages": PROMPT,
            },
            headers={"x-api-key": ALICE_KEY, "x-mock-delay-ms": "150", "x-mock-deltas": "6"},
        ) as response,
    ):
        assert response.status == 200
        first = await response.content.readuntil(b"\n\n")
        assert b"message_start" in first
        assert not response.content.at_eof()
        rest = await response.read()
    assert b"message_stop" in rest
    assert b"message_stop" not in first


async def test_stream_cut_by_upstream_is_charged_for_what_was_used(proxy) -> None:
    client = sdk(
        proxy,
        **{
            "x-mock-fail": "cut-stream",
            "x-mock-output-tokens": "400",
            "x-mock-input-tokens": "1000",
            "x-mock-deltas": "8",
        },
    )
    # the client sees the stream break as upstream broke it (the SDK's transport error)
    with pytest.raises(Exception, match=r"incomplete|peer closed"):
        async with client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=1024, messages=PROMPT
        ) as stream:
            await stream.get_final_message()
    [record] = await settled(proxy)
    assert record.status == "posted"
    assert record.outcome == "upstream_cut"
    assert record.usage.input_tokens == 1000
    assert record.usage.output_estimated
    assert 0 < record.usage.output_tokens < 400
    assert record.cost_nanos == 1000 * 3000 + record.usage.output_tokens * 15000
    # and the proxy keeps serving
    assert (
        await sdk(proxy).messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=PROMPT)
    ).usage.output_tokens > 0


async def test_client_disconnect_mid_stream_closes_upstream_and_is_charged(proxy) -> None:
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            proxy.make_url("/v1/messages"),
            json={
                "model": "claude-sonnet-4-5",
                "max_tokens": 500,
                "stream": True,
                "messages": PROMPT,
            },
            headers={
                "x-api-key": ALICE_KEY,
                "x-mock-delay-ms": "100",
                "x-mock-deltas": "20",
                "x-mock-output-tokens": "400",
                "x-mock-input-tokens": "700",
            },
        )
        # read past message_start and a few deltas, then go away
        seen = b""
        while seen.count(b"content_block_delta") < 3:
            seen += await response.content.readany()
        response.close()
    [record] = await settled(proxy)
    assert record.outcome == "client_disconnected"
    assert record.status == "posted"
    assert record.usage.input_tokens == 700
    assert record.usage.output_estimated
    assert 0 < record.usage.output_tokens < 400
    assert (
        await sdk(proxy).messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=PROMPT)
    ).usage.output_tokens > 0


async def test_error_event_mid_stream_reaches_the_client_as_sent(proxy) -> None:
    client = sdk(proxy, **{"x-mock-fail": "error-event", "x-mock-input-tokens": "50"})
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=100, messages=PROMPT
        ) as stream:
            await stream.get_final_message()
    assert "overloaded" in str(caught.value).lower()
    [record] = await settled(proxy)
    assert record.outcome == "upstream_error_event"
    assert record.usage.input_tokens == 50
