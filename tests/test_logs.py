"""The JSON log lines: their shape, the time stamp, and what orjson cannot write."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import pytest
import structlog

from proxy.logs import configure_logging


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("info", stream=out)
    yield out
    structlog.reset_defaults()


def logged(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_line_is_compact_json_with_level_and_a_utc_iso_time_stamp(lines) -> None:
    structlog.get_logger("t").info("request", status=200, cost_usd="0.25")
    [line] = logged(lines)
    assert line["event"] == "request" and line["level"] == "info"
    assert line["status"] == 200 and line["cost_usd"] == "0.25"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", line["timestamp"])
    assert ", " not in lines.getvalue()


def test_what_orjson_refuses_is_written_by_the_stdlib_and_nothing_is_lost(lines) -> None:
    structlog.get_logger("t").info("odd", big=2**70, thing=object)
    [line] = logged(lines)
    assert line["big"] == 2**70  # past 64 bits
    assert line["thing"] == repr(object)
    assert re.fullmatch(r"[-0-9T:.]+Z", line["timestamp"])


def test_below_the_level_nothing_is_written_and_exceptions_carry_their_traceback(lines) -> None:
    log = structlog.get_logger("t")
    log.debug("quiet")
    try:
        raise ValueError("broken")
    except ValueError:
        log.exception("failed")
    [line] = logged(lines)
    assert line["level"] == "error"
    assert "ValueError: broken" in line["exception"]
