"""structlog set-up and the canonical per-request line. Keys and prompts are never logged."""

from __future__ import annotations

import json as stdlib_json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

from proxy.exchange import Exchange
from proxy.money import format_usd


def configure_logging(
    level: str = "info", *, json: bool = True, stream: TextIO = sys.stdout
) -> None:
    """JSON lines (one per event) to stdout; called once by the CLI, never on import."""
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if json:  # the time as a datetime, which orjson writes as structlog's ISO stamp would
        processors += [_utc_now, structlog.processors.format_exc_info, json_line]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def _utc_now(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """`timestamp`: now, in UTC (0.2 us; structlog's ISO TimeStamper formats it itself, 1.9)."""
    event["timestamp"] = datetime.now(UTC)
    return event


def json_line(_: Any, __: str, event: dict[str, Any]) -> str:
    """The last processor: one event as compact JSON, orjson (a tenth of the stdlib's time for
    the request line), datetimes as `2026-12-07T06:49:47.427584Z`; what orjson refuses (an
    integer beyond 64 bits) goes through the stdlib, so logging never fails."""
    try:
        return orjson.dumps(event, default=repr, option=orjson.OPT_UTC_Z).decode()
    except orjson.JSONEncodeError:
        return stdlib_json.dumps(event, default=_plain, separators=(",", ":"))


def _plain(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return repr(value)


def request_line(ex: Exchange, *, method: str, path: str, status: int) -> dict[str, object]:
    """The fields of the one line that closes every request."""
    fields: dict[str, object] = {
        "request_id": ex.request_id,
        "method": method,
        "path": path,
        "status": status,
        "outcome": ex.outcome,
    }
    if ex.seat is not None:
        fields["member"] = ex.seat.email
        fields["org"] = ex.seat.org_id
    if ex.model is not None:
        fields["model"] = ex.model
        fields["stream"] = ex.stream
    if ex.usage is not None:
        u = ex.usage
        fields.update(
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_write_5m_tokens=u.cache_creation_5m_input_tokens,
            cache_write_1h_tokens=u.cache_creation_1h_input_tokens,
            cache_read_tokens=u.cache_read_input_tokens,
            output_estimated=u.output_estimated,
        )
    if ex.admitted:
        fields["cost_usd"] = format_usd(ex.cost_nanos)
        fields["billing"] = ex.billing
    if ex.upstream_ms is not None:
        fields["upstream_ms"] = round(ex.upstream_ms, 2)
    return fields
