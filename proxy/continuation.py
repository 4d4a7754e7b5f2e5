"""Continue links: an unguessable, single-member token that expires with the window that blocked."""

from __future__ import annotations

import hashlib
import hmac

TAG_HEX_CHARS = 32  # 128 bits of HMAC-SHA256


class InvalidLink(Exception):
    """A continue link that cannot be used; the message is shown to the person who opened it."""


class ContinueLinks:
    def __init__(self, secret: str, public_url: str) -> None:
        self._secret = secret.encode()
        self._public_url = public_url.rstrip("/")

    def url(self, member_id: int, expires_at_s: float) -> str:
        return f"{self._public_url}/continue/{self.token(member_id, expires_at_s)}"

    def token(self, member_id: int, expires_at_s: float) -> str:
        payload = f"{member_id}.{int(expires_at_s)}"
        return f"{payload}.{self._tag(payload)}"

    def member_id(self, token: str, now_s: float) -> int:
        """The member a token was made for; InvalidLink when forged, altered or expired."""
        payload, _, tag = token.rpartition(".")
        if not hmac.compare_digest(tag.encode(), self._tag(payload).encode()):
            raise InvalidLink("This continue link is not valid (it was altered or is not ours).")
        member, _, expires = payload.partition(".")
        if now_s >= int(expires):
            raise InvalidLink(
                "This continue link has expired: the window it was made for has reset, so your "
                "included quota is back. If you run out again, use the new link you are shown."
            )
        return int(member)

    def _tag(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()
        return digest[:TAG_HEX_CHARS]
