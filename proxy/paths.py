"""Which /v1 paths the proxy relays upstream as they are (SPEC §8), and which it refuses.

The HTTP client normalises a path before sending it (`/v1/../admin` goes out as `/admin`,
`/v1/%6dessages` as `/v1/messages`), and an upstream or a gateway in front of it may normalise
more. So a relayed path must not leave `/v1/` once decoded, and must not be another spelling of
the metered `/v1/messages`: either would let a member key reach upstream paths it must not, or
use the API unmetered with the proxy's own key.
"""

from __future__ import annotations

from urllib.parse import unquote

from proxy.errors import Refusal

RELAYED_PREFIX = "/v1/"
METERED_PATHS = frozenset({"/v1/messages"})  # served by their own handlers, never relayed
# Paid upstream that this proxy cannot meter (a batch's usage arrives hours later, in results it
# never sees; legacy completions have no price here): relaying them would spend the proxy's key
# unmetered, and "a request is never forwarded unpriced" (SPEC §3).
UNMETERED_PAID_PREFIXES = ("/v1/messages/batches", "/v1/complete")
# Inside a decoded segment: separators, escapes left after one decoding, path parameters,
# control characters.
REFUSED_CHARS = frozenset("/\\%;") | frozenset(map(chr, range(0x20))) | {"\x7f"}


def relayable(raw_path: str) -> bool:
    """True when `raw_path` (as the client sent it, still percent-encoded) may go upstream."""
    if not raw_path.startswith(RELAYED_PREFIX):
        return False
    segments = [unquote(segment) for segment in raw_path[len(RELAYED_PREFIX) :].split("/")]
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            return False
        if not segment and index != len(segments) - 1:  # `//`: only a trailing slash is kept
            return False
        if any(char in REFUSED_CHARS for char in segment):
            return False
    canonical = (RELAYED_PREFIX + "/".join(segments)).rstrip("/").lower()
    return canonical not in METERED_PATHS


def check_relayable(raw_path: str) -> None:
    """Refuse (never forwarded) a path that `relayable` turns down (404), or a paid one that the
    proxy cannot meter (400)."""
    path = raw_path.rstrip("/").lower()
    if any(path == p or path.startswith(p + "/") for p in UNMETERED_PAID_PREFIXES):
        raise Refusal(
            400,
            "invalid_request_error",
            f"{raw_path} is not available through this proxy: it would be billed without being "
            "metered. Send each request to POST /v1/messages instead.",
            outcome="unmetered_path",
        )
    if not relayable(raw_path):
        raise Refusal(
            404,
            "not_found_error",
            "This path cannot be relayed by the proxy (dot segments, encoded separators or "
            "another spelling of /v1/messages are refused).",
            outcome="path_refused",
        )
