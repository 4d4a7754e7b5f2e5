"""Metering of recorded Messages API responses: SSE streams fed in any chunking, and JSON bodies."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.metering import DELTAS_UNREAD_BYTES_MAX, SseMeter, Usage, usage_from_body

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass(frozen=True)
class StreamCase:
    fixture: str
    usage: Usage
    completed: bool
    relayed_text: str
    model: str
    error_type: str | None = None
    stop_reason: str | None = None


STREAM_CASES = [
    StreamCase(
        "stream_multi_delta.sse",
        Usage(input_tokens=2095, output_tokens=97),
        completed=True,
        relayed_text="The user wants the weather in Zürich; I should call the tool."
        "Let me check the weather in Zürich for you — one moment. ☀️"
        '{"location": "Zürich, CH", "unit": "celsius"}',
        model="claude-opus-4-8",
        stop_reason="tool_use",
    ),
    StreamCase(
        "stream_cut.sse",
        Usage(input_tokens=1337, output_tokens=1),
        completed=False,
        relayed_text="Here is a haiku about caches:\n\nWarm reads cost a tenth,\n"
        "cold writes pay a quarter more —",
        model="claude-sonnet-4-5-20250929",
    ),
    StreamCase(
        "stream_error_event.sse",
        Usage(input_tokens=812, output_tokens=1, cache_read_input_tokens=4096),
        completed=False,
        relayed_text="Sure. First, open the config file and",
        model="claude-opus-4-8",
        error_type="overloaded_error",
    ),
    StreamCase(
        "stream_cache_breakdown.sse",
        Usage(
            input_tokens=24,
            output_tokens=9,
            cache_creation_5m_input_tokens=1500,
            cache_creation_1h_input_tokens=12000,
            cache_read_input_tokens=51200,
        ),
        completed=True,
        relayed_text="The cached 系统提示 was reused.",
        model="claude-sonnet-4-6",
        stop_reason="end_turn",
    ),
    StreamCase(
        "stream_long_context.sse",
        Usage(
            input_tokens=150000,
            output_tokens=1843,
            cache_creation_5m_input_tokens=30000,  # no breakdown: 5-minute writes
            cache_read_input_tokens=25000,
        ),
        completed=True,
        relayed_text="Across the 412 files, the retry logic lives in two places.",
        model="claude-sonnet-4-5-20250929",
        stop_reason="end_turn",
    ),
    StreamCase(
        "stream_web_search.sse",
        Usage(input_tokens=10682, output_tokens=510, web_search_requests=1),
        completed=True,
        relayed_text="I'll search for that."
        '{"query": "aiohttp 3.14 release"}'
        "aiohttp 3.14 was released recently.",
        model="claude-opus-4-8",
        stop_reason="end_turn",
    ),
]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def byte_by_byte(data: bytes) -> Iterator[bytes]:
    for index in range(len(data)):
        yield data[index : index + 1]


def random_chunks(seed: int) -> Callable[[bytes], Iterator[bytes]]:
    def chunks(data: bytes) -> Iterator[bytes]:
        rng = random.Random(seed)
        start = 0
        while start < len(data):
            size = rng.randint(1, 64)
            yield data[start : start + size]
            start += size

    chunks.__name__ = f"random_chunks_{seed}"
    return chunks


CHUNKINGS = [whole, byte_by_byte, *(random_chunks(seed) for seed in (1, 2, 3, 42))]
LINE_ENDINGS = {"lf": b"\n", "crlf": b"\r\n"}


def meter_of(data: bytes, chunking: Callable[[bytes], Iterator[bytes]]) -> SseMeter:
    meter = SseMeter()
    for chunk in chunking(data):
        meter.feed(chunk)
    return meter


@pytest.mark.parametrize("line_ending", LINE_ENDINGS, ids=list(LINE_ENDINGS))
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda chunking: chunking.__name__)
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda case: case.fixture)
def test_stream_fixture_meters_the_same_in_any_chunking(
    case: StreamCase, chunking: Callable[[bytes], Iterator[bytes]], line_ending: str
) -> None:
    data = (FIXTURES / case.fixture).read_bytes().replace(b"\n", LINE_ENDINGS[line_ending])

    meter = meter_of(data, chunking)

    assert meter.usage == case.usage
    assert meter.completed is case.completed
    assert meter.error_type == case.error_type
    assert meter.relayed_text() == case.relayed_text
    assert meter.saw_message_start is True
    assert meter.model == case.model
    assert meter.stop_reason == case.stop_reason


def test_long_context_fixture_is_over_the_tier_threshold() -> None:
    meter = meter_of((FIXTURES / "stream_long_context.sse").read_bytes(), whole)

    assert meter.usage.prompt_tokens == 205000


def test_nothing_fed_is_nothing_seen() -> None:
    meter = SseMeter()

    assert meter.usage == Usage()
    assert (meter.completed, meter.saw_message_start, meter.error_type) == (False, False, None)
    assert meter.relayed_text() == ""


def sse(*events: tuple[str | None, object]) -> bytes:
    """An SSE stream of (event name or None, data) pairs; str data is sent verbatim."""
    out = []
    for name, data in events:
        if name is not None:
            out.append(f"event: {name}\n")
        text = data if isinstance(data, str) else json.dumps(data)
        out.extend(f"data: {line}\n" for line in text.split("\n"))
        out.append("\n")
    return "".join(out).encode()


def message_delta(usage: dict[str, object]) -> tuple[str, object]:
    return ("message_delta", {"type": "message_delta", "delta": {}, "usage": usage})


def message_start(usage: dict[str, object]) -> tuple[str, object]:
    message = {"id": "msg_01", "model": "claude-opus-4-8", "usage": usage}
    return ("message_start", {"type": "message_start", "message": message})


@pytest.mark.parametrize(
    ("outputs", "expected_output_tokens"),
    [
        ([1], 1),
        ([1, 10, 25], 25),
        ([5, 5, 5], 5),  # a repeated cumulative value is not summed
        ([1, 30, 12], 12),  # the last value wins, even when smaller
    ],
)
def test_cumulative_output_tokens_last_value_wins(
    outputs: list[int], expected_output_tokens: int
) -> None:
    start, *deltas = outputs
    stream = sse(
        message_start({"input_tokens": 7, "output_tokens": start}),
        *(message_delta({"output_tokens": output}) for output in deltas),
    )

    assert meter_of(stream, whole).usage == Usage(
        input_tokens=7, output_tokens=expected_output_tokens
    )


@pytest.mark.parametrize(
    ("start_usage", "delta_usage", "expected"),
    [
        (  # without the breakdown, cache writes count as 5-minute writes
            {"input_tokens": 3, "cache_creation_input_tokens": 100},
            {"output_tokens": 2},
            Usage(input_tokens=3, output_tokens=2, cache_creation_5m_input_tokens=100),
        ),
        (  # the delta repeats the total without the breakdown: the 1-hour part stays
            {
                "input_tokens": 3,
                "cache_creation_input_tokens": 300,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 100,
                    "ephemeral_1h_input_tokens": 200,
                },
            },
            {"output_tokens": 2, "cache_creation_input_tokens": 300},
            Usage(
                input_tokens=3,
                output_tokens=2,
                cache_creation_5m_input_tokens=100,
                cache_creation_1h_input_tokens=200,
            ),
        ),
        (  # a larger total later: the excess is 5-minute writes
            {
                "input_tokens": 3,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 0,
                    "ephemeral_1h_input_tokens": 200,
                },
            },
            {"output_tokens": 2, "cache_creation_input_tokens": 260},
            Usage(
                input_tokens=3,
                output_tokens=2,
                cache_creation_5m_input_tokens=60,
                cache_creation_1h_input_tokens=200,
            ),
        ),
        (  # input, cache reads and searches in the delta replace message_start's (latest wins)
            {"input_tokens": 3, "cache_read_input_tokens": 10},
            {
                "input_tokens": 40,
                "cache_read_input_tokens": 50,
                "output_tokens": 9,
                "server_tool_use": {"web_search_requests": 3},
            },
            Usage(
                input_tokens=40, output_tokens=9, cache_read_input_tokens=50, web_search_requests=3
            ),
        ),
        (  # null fields in the delta keep the earlier values
            {"input_tokens": 3, "cache_read_input_tokens": 10, "speed": "fast"},
            {"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 4},
            Usage(input_tokens=3, output_tokens=4, cache_read_input_tokens=10, speed="fast"),
        ),
    ],
)
def test_message_delta_usage_updates_message_start_usage(
    start_usage: dict[str, object], delta_usage: dict[str, object], expected: Usage
) -> None:
    stream = sse(message_start(start_usage), message_delta(delta_usage))

    assert meter_of(stream, byte_by_byte).usage == expected


def test_events_without_event_line_are_read_by_their_data_type() -> None:
    stream = sse(
        (None, message_start({"input_tokens": 11, "output_tokens": 1})[1]),
        (None, {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}),
        (None, message_delta({"output_tokens": 6})[1]),
        (None, {"type": "message_stop"}),
    )

    meter = meter_of(stream, whole)

    assert meter.usage == Usage(input_tokens=11, output_tokens=6)
    assert meter.completed is True
    assert meter.relayed_text() == "hi"


def test_skipped_and_malformed_events_do_not_disturb_metering() -> None:
    stream = (
        b": a comment line\n\n"
        + sse(
            message_start({"input_tokens": 11, "output_tokens": 1}),
            ("ping", "not json at all {"),
            ("content_block_start", "{broken"),
            # an event the meter does not read, even though its data looks like usage
            ("future_event", {"type": "message_delta", "usage": {"output_tokens": 999}}),
            ("message_delta", "{truncated json"),
            ("message_delta", [1, 2, 3]),
            ("content_block_delta", {"type": "content_block_delta", "delta": {"type": ["x"]}}),
            ("content_block_delta", {"type": "content_block_delta", "delta": "text"}),
            message_delta({"output_tokens": 8}),
        )
        + b"id: 1\nretry: 100\n\n"
    )

    meter = meter_of(stream, byte_by_byte)

    assert meter.usage == Usage(input_tokens=11, output_tokens=8)
    assert meter.relayed_text() == ""
    assert meter.completed is False


@pytest.mark.parametrize("chunking", CHUNKINGS[:3], ids=lambda chunking: chunking.__name__)
def test_a_long_stream_cut_late_keeps_all_its_text_and_little_unread(
    chunking: Callable[[bytes], Iterator[bytes]],
) -> None:
    """Deltas wait unread only up to a bound (the estimate of a long cut stream must not read
    thousands of them at once on the event loop), and none of their text is lost."""
    words = [f"word{n} " for n in range(2_000)]
    stream = sse(
        message_start({"input_tokens": 3, "output_tokens": 1}),
        *(
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": word}})
            for word in words
        ),
    )  # fmt: skip
    meter = SseMeter()
    unread_max = 0
    for chunk in chunking(stream):
        meter.feed(chunk)
        unread_max = max(unread_max, len(meter._deltas))

    assert meter.relayed_text() == "".join(words)
    assert meter.relayed_text() == "".join(words)  # asking again reads the same
    assert unread_max <= DELTAS_UNREAD_BYTES_MAX + 200  # the bound, and the one delta past it
    assert meter.completed is False


def test_multi_line_data_is_joined_with_newlines() -> None:
    pretty = json.dumps({"type": "message_delta", "usage": {"output_tokens": 5}}, indent=2)
    stream = sse(message_start({"input_tokens": 2}), ("message_delta", pretty))

    assert meter_of(stream, whole).usage == Usage(input_tokens=2, output_tokens=5)


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda chunking: chunking.__name__)
def test_stream_reads_json_as_the_stdlib_does(chunking: Callable[[bytes], Iterator[bytes]]) -> None:
    """orjson reads the events; the stdlib where orjson would read otherwise or refuse."""
    stream = sse(
        message_start({"input_tokens": 10**20, "output_tokens": 1}),
        (
            "content_block_delta",
            '{"type":"content_block_delta","delta":{"type":"text_delta","text":"a\\ud800b"}}',
        ),
        (
            "content_block_delta",
            '{"type":"content_block_delta","index":NaN,"delta":{"type":"text_delta","text":"c"}}',
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "d\u00e9"}},
        ),
        message_delta({"output_tokens": 2**64 + 1}),
    )

    meter = meter_of(stream, chunking)

    assert meter.usage == Usage(input_tokens=10**20, output_tokens=2**64 + 1)
    assert meter.relayed_text() == "a\ud800bcd\u00e9"


def test_error_event_without_a_type_is_still_an_error() -> None:
    stream = sse(("error", {"type": "error", "error": "boom"}))

    assert meter_of(stream, whole).error_type == "error"


def test_an_event_without_its_closing_blank_line_is_not_counted() -> None:
    stream = sse(message_start({"input_tokens": 2, "output_tokens": 1}))
    stream += b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":40}}\n'

    assert meter_of(stream, whole).usage.output_tokens == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            (FIXTURES / "message_nonstream.json").read_bytes(),
            Usage(
                input_tokens=2095,
                output_tokens=503,
                cache_creation_1h_input_tokens=2048,
                cache_read_input_tokens=1024,
                web_search_requests=2,
                speed="fast",
            ),
        ),
        (
            b'{"usage": {"input_tokens": 5, "cache_creation_input_tokens": 70, '
            b'"output_tokens": 3}}',
            Usage(input_tokens=5, output_tokens=3, cache_creation_5m_input_tokens=70),
        ),
        (b'{"usage": {"input_tokens": -5, "output_tokens": true}}', Usage()),
        (b"", None),
        (b"not json", None),
        (b"\xff\xfe{", None),
        (b"[1, 2]", None),
        (
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
            None,
        ),
        (b'{"usage": "many"}', None),
        (b"[" * 100_000 + b"]" * 100_000, None),
        # read as json.loads reads them, where orjson (the fast path) would differ or refuse
        (
            b'{"usage": {"input_tokens": 10000000000000000000000, "output_tokens": 3, '
            b'"cache_creation": {"ephemeral_1h_input_tokens": 100000000000000000000}}}',
            Usage(input_tokens=10**22, output_tokens=3, cache_creation_1h_input_tokens=10**20),
        ),
        (b'{"usage": {"input_tokens": 2.0, "output_tokens": 3}}', Usage(output_tokens=3)),
        (b'{"usage": {"input_tokens": NaN, "output_tokens": 3}}', Usage(output_tokens=3)),
        (b'{"id": "\\ud800", "usage": {"output_tokens": 3}}', Usage(output_tokens=3)),
        (b'\xef\xbb\xbf{"usage": {"output_tokens": 3}}', Usage(output_tokens=3)),
        (b"[" * 1_010 + b"]" * 1_010, None),
    ],
    ids=[
        "fixture",
        "no-breakdown-is-5m",
        "junk-counts",
        "empty",
        "not-json",
        "not-utf8",
        "not-object",
        "error-body",
        "usage-not-object",
        "deeply-nested",
        "counts-beyond-64-bits",
        "float-count",
        "nan",
        "lone-surrogate",
        "bom",
        "nested-past-orjson",
    ],
)
def test_usage_from_body(body: bytes, expected: Usage | None) -> None:
    assert usage_from_body(body) == expected
