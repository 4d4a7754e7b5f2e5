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


class Refusal(Exception):
    """An expected outcome answered to the client as an Anthropic-shaped error; never forwarded."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        outcome: str,
        headers: dict[str, str] | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.outcome = outcome
        self.headers = headers or {}
        self.details = details

    def body(self) -> dict:
        extra = {"details": self.details} if self.details is not None else {}
        return error_body(self.error_type, self.message, **extra)


def bad_request(message: str) -> Refusal:
    return Refusal(400, "invalid_request_error", message, outcome="bad_request")


def unauthenticated(message: str) -> Refusal:
    return Refusal(401, "authentication_error", message, outcome="unauthenticated")
