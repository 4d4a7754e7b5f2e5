"""Pure metering: token usage from Messages API responses (JSON bodies and SSE streams). No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
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
        writes. `output_tokens` is cumulative in the API, so a later value replaces an earlier one.
        """
        base = base or cls()
        breakdown = usage.get("cache_creation")
        if isinstance(breakdown, dict):
            write_5m = _count(breakdown.get("ephemeral_5m_input_tokens"))
            write_1h = _count(breakdown.get("ephemeral_1h_input_tokens"))
        elif usage.get("cache_creation_input_tokens") is not None:
            write_5m = _count(usage.get("cache_creation_input_tokens"))
            write_1h = 0
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


def _count(value: Any) -> int:
    """A token count from the wire: a non-negative int, anything else counts as 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def _pick(usage: dict[str, Any], name: str, default: int) -> int:
    return _count(usage[name]) if usage.get(name) is not None else default
