"""GET /metrics: the real app against the mock upstream, read back with Prometheus's parser."""

from __future__ import annotations

import asyncio

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.exchange import Exchange
from proxy.metrics import Metrics, added_latency_s
from proxy.tasks import Tasks
from tests.conftest import ALICE_KEY, settled
from tests.test_e2e_sdk import PROMPT, SCRIPTED_COST_NANOS, SCRIPTED_USAGE, sdk
from tests.test_quota_e2e import COST, COST_NANOS, SMALL_PLANS, spend

MESSAGES = "/v1/messages"
SONNET = "claude-sonnet-4-5"  # the canonical id in pricing.toml; the dated id is an alias of it


class Scrape:
    """One exposition, parsed: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a series never seen (as Prometheus would treat a counter)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(proxy: TestServer) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(proxy.make_url("/metrics")) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        return Scrape(await response.text())


async def test_requests_tokens_and_cost_of_a_plain_and_a_streamed_request(proxy) -> None:
    client = sdk(proxy, **SCRIPTED_USAGE)
    await client.messages.create(model=SONNET, max_tokens=1024, messages=PROMPT)
    async with client.messages.stream(
        model="claude-sonnet-4-5-20250929", max_tokens=1024, messages=PROMPT
    ) as stream:
        await stream.get_final_message()
    records = await settled(proxy, 2)

    metrics = await scrape(proxy)
    requests = "usage_proxy_requests_total"
    assert metrics.value(requests, route=MESSAGES, outcome="ok", status="200") == 2
    tokens = "usage_proxy_tokens_total"
    assert metrics.value(tokens, model=SONNET, kind="input") == 2 * 1000
    assert metrics.value(tokens, model=SONNET, kind="output") == 2 * 200
    assert metrics.value(tokens, model=SONNET, kind="cache_write_5m") == 2 * 300
    assert metrics.value(tokens, model=SONNET, kind="cache_write_1h") == 2 * 100
    assert metrics.value(tokens, model=SONNET, kind="cache_read") == 2 * 5000
    cost = metrics.value("usage_proxy_cost_nanos_total", model=SONNET, billing="included")
    assert cost == sum(record.cost_nanos for record in records) == 2 * SCRIPTED_COST_NANOS
    assert metrics.value("usage_proxy_cost_nanos_total", model=SONNET, billing="extra") == 0

    assert metrics.value("usage_proxy_upstream_latency_seconds_count") == 2
    assert metrics.value("usage_proxy_upstream_latency_seconds_sum") > 0
    assert metrics.value("usage_proxy_added_latency_seconds_count") == 2
    added_s = metrics.value("usage_proxy_added_latency_seconds_sum")
    assert 0 < added_s < metrics.value("usage_proxy_upstream_latency_seconds_sum") + 1
    assert metrics.value("usage_proxy_open_streams") == 0
    assert metrics.value("usage_proxy_background_tasks") >= 1  # the sweeper, at least
    assert metrics.value("usage_proxy_refusals_total", limit="session") == 0


async def test_open_streams_and_pending_reservations_while_a_stream_is_relayed(proxy) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.make_url(MESSAGES),
            json={"model": SONNET, "max_tokens": 100, "stream": True, "messages": PROMPT},
            headers={"x-api-key": ALICE_KEY, "x-mock-delay-ms": "100", "x-mock-deltas": "4"},
        ) as response,
    ):
        await response.content.readuntil(b"\n\n")  # message_start: the stream is open
        during = await scrape(proxy)
        assert during.value("usage_proxy_open_streams") == 1
        assert during.value("usage_proxy_pending_reservations") == 1  # admitted, not settled
        await response.read()
    await settled(proxy)
    after = await scrape(proxy)
    assert after.value("usage_proxy_open_streams") == 0
    assert after.value("usage_proxy_pending_reservations") == 0


async def test_a_quota_refusal_is_counted_by_its_limit(start_proxy) -> None:
    proxy = await start_proxy(plans=SMALL_PLANS)
    await spend(proxy, times=2)
    with pytest.raises(anthropic.RateLimitError):
        await spend(proxy)
    await settled(proxy, 2)

    metrics = await scrape(proxy)
    assert metrics.value("usage_proxy_refusals_total", limit="session") == 1
    assert (
        metrics.value(
            "usage_proxy_requests_total", route=MESSAGES, outcome="refused_session", status="429"
        )
        == 1
    )
    assert metrics.value("usage_proxy_requests_total", route=MESSAGES, outcome="ok", status="200")
    # a refused request is never forwarded: only the two answered ones have latencies
    assert metrics.value("usage_proxy_upstream_latency_seconds_count") == 2
    assert metrics.value("usage_proxy_added_latency_seconds_count") == 2
    cost = metrics.value("usage_proxy_cost_nanos_total", model=SONNET, billing="included")
    assert cost == 2 * COST_NANOS


async def test_metrics_hold_no_key_email_or_continue_token(start_proxy) -> None:
    proxy = await start_proxy(plans=SMALL_PLANS)
    await spend(proxy, times=2)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await spend(proxy)
    path = URL(caught.value.response.json()["error"]["details"]["continue"]["url"]).path
    token = path.rsplit("/", 1)[1]
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url(path)) as page:
            assert page.status == 200
        async with http.get(proxy.make_url("/v1/models"), headers={"x-api-key": ALICE_KEY}):
            pass
        async with http.get(proxy.make_url("/nowhere")) as missing:
            assert missing.status == 404
    await settled(proxy, 2)

    metrics = await scrape(proxy)
    for secret in (ALICE_KEY, "alice@acme.test", "acme", token):
        assert secret not in metrics.text
    requests = "usage_proxy_requests_total"
    assert metrics.value(requests, route="/continue/{token}", outcome="ok", status="200") == 1
    assert metrics.value(requests, route="/v1/{tail}", outcome="ok", status="200") == 1
    assert metrics.value(requests, route="unmatched", outcome="rejected", status="404") == 1
    routes = {labels for name, labels in metrics.samples if name == requests}
    assert {dict(labels)["route"] for labels in routes} == {
        MESSAGES,
        "/continue/{token}",
        "/v1/{tail}",
        "unmatched",
    }


async def test_a_plain_request_whose_client_left_is_counted_when_it_is_charged(proxy) -> None:
    timeout = aiohttp.ClientTimeout(total=0.2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        with pytest.raises(asyncio.TimeoutError):
            await http.post(
                proxy.make_url(MESSAGES),
                json={"model": SONNET, "max_tokens": 500, "messages": PROMPT},
                headers={"x-api-key": ALICE_KEY, "x-mock-delay-ms": "500", **COST},
            )
    [record] = await settled(proxy)
    assert record.cost_nanos == COST_NANOS
    cost = "usage_proxy_cost_nanos_total"
    for _ in range(100):  # recorded when the forward ends, just before or after settlement
        metrics = await scrape(proxy)
        if metrics.value(cost, model=SONNET, billing="included") == COST_NANOS:
            break
        await asyncio.sleep(0.02)
    assert metrics.value(cost, model=SONNET, billing="included") == COST_NANOS
    assert metrics.value("usage_proxy_tokens_total", model=SONNET, kind="input") == 1000
    assert metrics.value("usage_proxy_tokens_total", model=SONNET, kind="output") == 200
    disconnected = [
        value
        for (name, labels), value in metrics.samples.items()
        if name == "usage_proxy_requests_total" and ("outcome", "client_disconnected") in labels
    ]
    assert disconnected == [1]


def exchange(**fields: object) -> Exchange:
    return Exchange(request_id="req_test", started_s=100.0, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ex", "duration_s", "added_s"),
    [
        (exchange(), 0.002, None),  # refused or rejected: never forwarded
        (exchange(model=SONNET, forwarded_s=100.001, upstream_ms=500.0), 0.502, 0.002),
        (exchange(model=SONNET, stream=True, forwarded_s=100.001, upstream_ms=300.0), 9.0, 0.001),
        (exchange(forwarded_s=100.0005, upstream_ms=40.0), 3.0, 0.0005),  # a relayed /v1 path
        (exchange(model=SONNET, forwarded_s=100.001), 0.1, 0.001),  # client left before upstream
    ],
)
def test_added_latency_is_the_proxy_s_own_time(
    ex: Exchange, duration_s: float, added_s: float | None
) -> None:
    assert added_latency_s(ex, duration_s) == pytest.approx(added_s)


@pytest.mark.both_stores
async def test_the_postgresql_stores_batches_are_counted(start_proxy, store_url: str) -> None:
    proxy = await start_proxy()
    client = sdk(proxy)
    await asyncio.gather(
        *(client.messages.create(model=SONNET, max_tokens=64, messages=PROMPT) for _ in range(3))
    )
    await settled(proxy, 3)
    metrics = await scrape(proxy)
    batches = metrics.value("usage_proxy_store_batches_total")
    steps = metrics.value("usage_proxy_store_batched_steps_total")
    if store_url.startswith("sqlite"):  # its own group commit has no such counters
        assert "usage_proxy_store_batches" not in metrics.text
        return
    leased = metrics.value("usage_proxy_store_leased_steps_total")
    assert steps + leased == 6  # three admissions, three settlements: batched or from a lease
    assert steps >= 2 and leased >= 2  # the first request's in batches; it took a lease
    assert batches >= 2  # one request's admission and settlement never share one
    assert metrics.value("usage_proxy_store_steps_alone_total") == 0


def test_a_latency_counts_in_every_bucket_whose_bound_holds_it() -> None:
    metrics = Metrics(Tasks())
    for value_s in (0.0001, 0.00011, 400.0):  # on a bound, just past it, past every bound
        metrics.added_latency.observe(value_s)
    exposed = Scrape(metrics.exposition().decode())
    bucket = "usage_proxy_added_latency_seconds_bucket"
    assert exposed.value(bucket, le="0.0001") == 1
    assert exposed.value(bucket, le="0.00025") == 2
    assert exposed.value(bucket, le="1.0") == 2
    assert exposed.value(bucket, le="+Inf") == 3
    assert exposed.value("usage_proxy_added_latency_seconds_count") == 3
    assert exposed.value("usage_proxy_added_latency_seconds_sum") == 0.0001 + 0.00011 + 400.0
