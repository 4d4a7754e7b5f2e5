"""Sessions: ids and CSRF tokens, expiry by the clock, logout, a bounded count."""

from __future__ import annotations

from proxy.clock import FakeClock
from proxy.ui.sessions import ANONYMOUS_TTL_S, SESSION_TTL_S, Sessions


def test_sign_in_sessions_expire_after_their_ttl() -> None:
    clock = FakeClock()
    sessions = Sessions(clock)
    signed_in = sessions.begin(key_sha256="ab" * 32)
    form = sessions.begin()
    assert signed_in.signed_in and not form.signed_in
    clock.advance(ANONYMOUS_TTL_S)
    assert sessions.find(form.id) is None
    assert sessions.find(signed_in.id) is signed_in
    clock.advance(SESSION_TTL_S - ANONYMOUS_TTL_S)
    assert sessions.find(signed_in.id) is None


def test_each_session_has_its_own_id_and_csrf_token() -> None:
    sessions = Sessions(FakeClock())
    a, b = sessions.begin(operator=True), sessions.begin(operator=True)
    assert a.id != b.id and a.csrf_token != b.csrf_token
    assert a.csrf_ok(a.csrf_token)
    assert not a.csrf_ok(b.csrf_token)
    assert not a.csrf_ok(None) and not a.csrf_ok("")


def test_end_forgets_the_session() -> None:
    sessions = Sessions(FakeClock())
    session = sessions.begin(operator=True)
    sessions.end(session.id)
    assert sessions.find(session.id) is None
    assert sessions.find(None) is None


def test_the_count_is_bounded_expired_first_then_oldest() -> None:
    clock = FakeClock()
    sessions = Sessions(clock, max_count=3)
    stale = sessions.begin()  # a sign-in form, expires first
    oldest = sessions.begin(operator=True)
    clock.advance(ANONYMOUS_TTL_S)
    newer = sessions.begin(operator=True)
    kept = sessions.begin(operator=True)  # full: the expired one goes
    assert sessions.find(stale.id) is None and sessions.find(oldest.id) is oldest
    newest = sessions.begin(operator=True)  # full again, nothing expired: the oldest goes
    assert len(sessions) == 3
    assert sessions.find(oldest.id) is None
    assert [sessions.find(s.id) for s in (newer, kept, newest)] == [newer, kept, newest]


def test_a_notice_is_shown_once() -> None:
    session = Sessions(FakeClock()).begin(operator=True)
    session.notice = "Saved."
    assert session.pop_notice() == "Saved."
    assert session.pop_notice() is None
