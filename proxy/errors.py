"""Failures of configuration and the Anthropic-shaped error bodies the proxy answers with."""

from __future__ import annotations


class ConfigError(Exception):
    """A config file (or argument) that cannot be used: names the file, the key and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


def error_body(error_type: str, message: str, **extra: object) -> dict:
    """The body shape the Messages API uses for errors (and that the SDKs parse)."""
    error: dict[str, object] = {"type": error_type, "message": message}
    error.update(extra)
    return {"type": "error", "error": error}
