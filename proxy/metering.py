"""Pure metering: token usage from Messages API responses (JSON bodies and SSE streams). No I/O."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)  # built for every request: not frozen (ledger.py says why)
class Usage:
    """Tokens one response used, with the wire names of the API's `usage` object."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    web_search_requests: int = 0
    speed: str = "standard"  # usage.speed: "standard" | "fast"
    output_estimated: bool = False  # output counted by tiktoken from relayed deltas (cut stream)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt, as the long-context tier counts them."""
        return (
            self.input_tokens
            + self.cache_creation_5m_input_tokens
            + self.cache_creation_1h_input_tokens
            + self.cache_read_input_tokens
        )

    @classmethod
    def from_api(cls, usage: dict[str, Any], base: Usage | None = None) -> Usage:
        """Read an API `usage` object; fields it lacks keep their value from `base`.

        `cache_creation_input_tokens` without the `cache_creation` breakdown counts as 5-minute
        writes, except for the 1-hour writes `base` already holds (a `message_delta` repeats the
        total of `message_start` without its breakdown). `output_tokens` is cumulative in the API,
        so a later value replaces an earlier one.
        """
        base = base or NO_USAGE
        breakdown = usage.get("cache_creation")
        if isinstance(breakdown, dict):
            write_5m = _count(breakdown.get("ephemeral_5m_input_tokens"))
            write_1h = _count(breakdown.get("ephemeral_1h_input_tokens"))
        elif usage.get("cache_creation_input_tokens") is not None:
            # message_delta repeats the total without the breakdown: keep the 1-hour part that
            # message_start reported (up to the new total); the rest are 5-minute writes.
            write_total = _count(usage.get("cache_creation_input_tokens"))
            write_1h = min(base.cache_creation_1h_input_tokens, write_total)
            write_5m = write_total - write_1h
        else:
            write_5m = base.cache_creation_5m_input_tokens
            write_1h = base.cache_creation_1h_input_tokens
        server_tools = usage.get("server_tool_use")
        searches = base.web_search_requests
        if isinstance(server_tools, dict) and server_tools.get("web_search_requests") is not None:
            searches = _count(server_tools.get("web_search_requests"))
        speed = usage.get("speed")
        return cls(
            input_tokens=_pick(usage, "input_tokens", base.input_tokens),
            output_tokens=_pick(usage, "output_tokens", base.output_tokens),
            cache_creation_5m_input_tokens=write_5m,
            cache_creation_1h_input_tokens=write_1h,
            cache_read_input_tokens=_pick(
                usage, "cache_read_input_tokens", base.cache_read_input_tokens
            ),
            web_search_requests=searches,
            speed=speed if speed in ("standard", "fast") else base.speed,
            output_estimated=base.output_estimated,
        )


NO_USAGE = Usage()  # frozen: shared, not built anew for every stream (a dataclass init, ~1 us)


def _count(value: Any) -> int:
    """A token count from the wire: a non-negative int, anything else counts as 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def _pick(usage: dict[str, Any], name: str, default: int) -> int:
    return _count(usage[name]) if usage.get(name) is not None else default


def usage_from_body(body: bytes) -> Usage | None:
    """Usage of a non-streaming Messages response; None when the body is not JSON or has none."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    return Usage.from_api(usage) if isinstance(usage, dict) else None


def parse_json(raw: bytes) -> Any:
    """What `json.loads` reads from `raw` (None where it fails), in a third of its time: see
    `load_json`; the only numbers read here are the usage counts."""
    try:
        return load_json(raw, reread=_has_float_count)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; nesting
        return None


def load_json(raw: bytes, *, reread: Callable[[Any], bool]) -> Any:
    """What `json.loads` reads from `raw`, raising what it raises: orjson where it agrees with
    the stdlib; the stdlib for what orjson refuses (NaN, a lone surrogate, a BOM, nesting past
    1,024), and where `reread(payload)` finds a float orjson may have made of an integer beyond
    64 bits (the stdlib reads an int there)."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
    return json.loads(raw) if reread(payload) else payload


def _has_float_count(payload: Any) -> bool:
    """A float among the usage counts of a message or a message_start (`message.usage`) or of a
    message_delta (`usage`): there orjson may have read an integer beyond 64 bits."""
    if not isinstance(payload, dict):
        return False
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        message = payload.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        if not isinstance(usage, dict):
            return False
    for value in usage.values():
        if type(value) is float:
            return True
        if type(value) is dict and any(type(inner) is float for inner in value.values()):
            return True
    return False


# Events whose data the meter reads; any other named event (ping, content_block_start/stop, new
# kinds) is skipped on its `event:` line, before its `data:` is even kept.
_READ_EVENTS = frozenset(
    {b"message_start", b"message_delta", b"message_stop", b"content_block_delta", b"error"}
)
_DELTA_END = b"\0"  # follows each content delta's data in SseMeter._deltas
# At most this much of a stream's deltas waits unread: beyond it, what waits is read into text
# at once (about 80 deltas, 0.1 ms), so that the estimate of a long stream cut late never reads
# it all in one go on the event loop (10,000 deltas took 15 ms, measured).
DELTAS_UNREAD_BYTES_MAX = 8 * 1024
# content_block_delta kinds whose text the client received, and the field that holds it.
_DELTA_TEXT_FIELDS = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}


class SseMeter:
    """Incremental reader of a Messages API SSE stream: usage, completion and relayed text.

    Feed it the stream's bytes as they are relayed, in chunks of any size (lines end with `\\n`
    or `\\r\\n`). It keeps only the current partial line, the current event's data lines and the
    content deltas' data (for estimating the output of a stream cut before `message_stop`).

    The deltas, nearly every event of a stream, are kept as they came and read only when that
    estimate is wanted (`relayed_text`), which a stream that completes never asks for (this and
    the `find` in `feed`: 2.88 -> 2.65 M instructions a stream, docs/performance.md), or when
    more than DELTAS_UNREAD_BYTES_MAX of them wait. A named event is read as its name says. Each
    delta's data is followed by a NUL byte, which JSON text cannot hold (RFC 8259 escapes
    control characters), so it cannot occur inside one; the raw data costs about as much memory
    as the text did as strings.
    """

    __slots__ = (
        "_data",
        "_deltas",
        "_event",
        "_pending",
        "_skip",
        "_texts",
        "completed",
        "error_type",
        "model",
        "saw_message_start",
        "stop_reason",
        "usage",
    )

    def __init__(self) -> None:
        self.usage = NO_USAGE
        self.completed = False  # message_stop seen
        self.error_type: str | None = None  # error.type of an `error` event
        self.saw_message_start = False
        self.model: str | None = None  # message.model of message_start
        self.stop_reason: str | None = None  # delta.stop_reason of the last message_delta
        self._deltas = bytearray()  # content deltas' data not read yet, each then _DELTA_END
        self._texts: list[str] = []  # the text of the deltas read so far
        self._pending = bytearray()  # an unfinished line
        self._event: bytes | None = None  # the `event:` name of the event being read
        self._data: list[bytes] = []  # its `data:` lines
        self._skip = False  # its name says it carries nothing to meter

    def feed(self, chunk: bytes) -> None:
        """Read the next bytes of the stream."""
        if self._pending:
            newline = chunk.find(b"\n")
            if newline < 0:
                self._pending += chunk
                return
            self._pending += chunk[:newline]
            lines = chunk[newline + 1 :].split(b"\n")
            lines.insert(0, bytes(self._pending))
            self._pending.clear()
        else:
            lines = chunk.split(b"\n")
        tail = lines.pop()  # after the last newline: an unfinished line, or b""
        # find, not `in`: bytes.__contains__ first tries its argument as an integer, and
        # building and clearing that TypeError cost more than the rest of the check (callgrind)
        crlf = chunk.find(b"\r") >= 0 or (lines and lines[0][-1:] == b"\r")
        # One event is three lines (event:, data:, blank): read inline, not one call a line.
        for line in lines:
            if crlf and line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                self._dispatch()
            elif line[:5] == b"data:":  # the field is what comes before the first colon
                if not self._skip:
                    self._data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line[:6] == b"event:":
                name = line[7:] if line[6:7] == b" " else line[6:]
                self._event = name
                self._skip = name not in _READ_EVENTS
                if self._skip:
                    self._data.clear()
            # comments (":..."), id: and retry: carry nothing to meter
        if tail:
            self._pending += tail

    def relayed_text(self) -> str:
        """The text of every content delta seen (text, tool input JSON, thinking), joined."""
        return "".join([*self._texts, _text_of(self._deltas)])

    def _dispatch(self) -> None:
        """A blank line ends an event: act on it, then start the next."""
        name, data, skip = self._event, self._data, self._skip
        self._event, self._skip = None, False
        if skip:
            return
        if name == b"message_stop":
            self.completed = True
            data.clear()
            return
        if not data:
            return
        raw = data[0] if len(data) == 1 else b"\n".join(data)
        data.clear()
        if name == b"content_block_delta":
            self._keep_delta(raw)
            return
        payload = parse_json(raw)
        if isinstance(payload, dict):
            self._read(payload, raw)

    def _keep_delta(self, raw: bytes) -> None:
        self._deltas += raw
        self._deltas += _DELTA_END
        if len(self._deltas) > DELTAS_UNREAD_BYTES_MAX:
            self._texts.append(_text_of(self._deltas))
            self._deltas.clear()

    def _read(self, payload: dict[str, Any], raw: bytes) -> None:
        kind = payload.get("type")
        if kind == "content_block_delta":  # an event with no name, read by its type
            self._keep_delta(raw)
        elif kind == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, dict):
                self.usage = Usage.from_api(usage, self.usage)
            delta = payload.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
        elif kind == "message_start":
            self.saw_message_start = True
            message = payload.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    self.model = message["model"]
                usage = message.get("usage")
                if isinstance(usage, dict):
                    self.usage = Usage.from_api(usage, self.usage)
        elif kind == "message_stop":
            self.completed = True
        elif kind == "error":
            error = payload.get("error")
            error_type = error.get("type") if isinstance(error, dict) else None
            self.error_type = error_type if isinstance(error_type, str) else "error"


def _text_of(deltas: bytearray) -> str:
    """The text of content deltas kept as they came (`SseMeter._deltas`), joined."""
    texts = []
    for raw in deltas.split(_DELTA_END)[:-1]:
        payload = parse_json(raw)
        delta = payload.get("delta") if isinstance(payload, dict) else None
        if isinstance(delta, dict):
            delta_type = delta.get("type")
            field = _DELTA_TEXT_FIELDS.get(delta_type) if isinstance(delta_type, str) else None
            text = delta.get(field) if field else None
            if isinstance(text, str):
                texts.append(text)
    return "".join(texts)
