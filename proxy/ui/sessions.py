"""Sign-in sessions of the web pages: held by the process (never in the cookie), ended by
logout or by time; each carries the CSRF token that every form must send back."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from proxy.clock import Clock

COOKIE = "usage_proxy_session"
CSRF_FIELD = "csrf_token"
SESSION_TTL_S = 12 * 3600  # a sign-in lasts this long, then the key must be given again
ANONYMOUS_TTL_S = 3600  # a sign-in form (its CSRF token) is good for this long
MAX_SESSIONS = 10_000  # beyond this the oldest are dropped: memory stays bounded


@dataclass(slots=True)
class Session:
    """One browser's sign-in. Before sign-in (the login form) it only has its CSRF token.

    The key itself is never kept: a member's or owner's session holds the SHA-256 of their key
    (looked up again on every request, so a revoked key or a changed role takes effect at once),
    the operator's holds `operator`."""

    id: str
    csrf_token: str
    expires_at_s: float
    key_sha256: str | None = None
    operator: bool = False
    notice: str | None = None  # shown once on the next page (after a form was saved)

    @property
    def signed_in(self) -> bool:
        return self.operator or self.key_sha256 is not None

    def csrf_ok(self, sent: object) -> bool:
        return isinstance(sent, str) and hmac.compare_digest(
            sent.encode(), self.csrf_token.encode()
        )

    def pop_notice(self) -> str | None:
        notice, self.notice = self.notice, None
        return notice


class Sessions:
    """The sessions of this process, by id. Replicas do not share them: sign in on each (or
    route a browser to one replica)."""

    def __init__(self, clock: Clock, *, max_count: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._max_count = max_count
        self._by_id: dict[str, Session] = {}

    def begin(self, *, key_sha256: str | None = None, operator: bool = False) -> Session:
        """A new session (a new id and CSRF token: signing in never keeps the form's session)."""
        now_s = self._clock.now_s()
        if len(self._by_id) >= self._max_count:
            self._drop_expired(now_s)
        while len(self._by_id) >= self._max_count:
            del self._by_id[next(iter(self._by_id))]  # the oldest
        signed_in = operator or key_sha256 is not None
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf_token=secrets.token_urlsafe(32),
            expires_at_s=now_s + (SESSION_TTL_S if signed_in else ANONYMOUS_TTL_S),
            key_sha256=key_sha256,
            operator=operator,
        )
        self._by_id[session.id] = session
        return session

    def find(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is not None and self._clock.now_s() >= session.expires_at_s:
            del self._by_id[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._by_id)

    def _drop_expired(self, now_s: float) -> None:
        for session_id in [i for i, s in self._by_id.items() if now_s >= s.expires_at_s]:
            del self._by_id[session_id]
