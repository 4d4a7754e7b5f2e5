"""The only outbound HTTP to the Messages API: which headers go up and come back, and faults
before an answer as 502/504 refusals. The connections themselves are http1.py's."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import Refusal
from proxy.http1 import Client, OnHead, Response, UpstreamError, UpstreamTimeout
from proxy.settings import UpstreamSettings

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those we set ourselves.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# The member's key, and the proxy's own request header (SPEC §7), never go upstream; nor does
# accept-encoding (http1.py asks for identity, and undoes gzip or deflate if sent anyway).
NOT_FORWARDED = HOP_BY_HOP | {"x-api-key", "authorization", "x-extra-usage", "accept-encoding"}
NOT_RETURNED = HOP_BY_HOP | {"content-encoding"}  # bodies are relayed decoded
RATELIMIT_PREFIX = "anthropic-ratelimit-"


class Upstream:
    """Sends requests to the upstream API with the proxy's key in place of the member's."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._client: Client | None = None

    async def start(self) -> None:
        self._client = Client(
            self._settings.base_url,
            connections_max=self._settings.connections_max,
            connect_timeout_s=self._settings.connect_timeout_s,
            read_timeout_s=self._settings.timeout_s,  # idle: no byte for this long
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def request_headers(self, incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """The client's headers as sent, less hop-by-hop ones and the member's credentials."""
        headers = CIMultiDict(incoming)  # a copy, then deletions: a sixth of a filtered rebuild
        for name in NOT_FORWARDED:
            if name in headers:  # case-insensitive; `del` removes every value of the name
                del headers[name]
        headers["x-api-key"] = self._settings.api_key
        return headers

    def response_headers(self, incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """Upstream's headers less hop-by-hop ones, the encoding we undid, and (by default) the
        upstream key's own rate-limit headers, which say nothing about the member."""
        headers = CIMultiDict(incoming)
        for name in NOT_RETURNED:
            if name in headers:
                del headers[name]
        if not self._settings.forward_ratelimit_headers:
            prefix_chars = len(RATELIMIT_PREFIX)  # header names are ASCII tokens
            for name in [n for n in headers if n[:prefix_chars].lower() == RATELIMIT_PREFIX]:
                headers.popall(name, None)  # a name seen twice is gone after the first
        return headers

    def send(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes,
        on_head: OnHead | None = None,
    ) -> Sending:
        """Open one upstream request (`async with`); faults before the response head become
        502/504 refusals; an answer not read to its end closes its connection on the way out.
        `on_head`: see `http1.Client.request`."""
        assert self._client is not None, "Upstream.start() was not called"
        return Sending(self._client, method, path_qs, headers, body, on_head)


class Sending:
    """`async with upstream.send(...) as response`: a class, not an @asynccontextmanager, which
    costs a generator and its frames every request."""

    __slots__ = ("_body", "_client", "_headers", "_method", "_on_head", "_path_qs", "_response")

    def __init__(
        self,
        client: Client,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes,
        on_head: OnHead | None,
    ) -> None:
        self._client = client
        self._on_head = on_head
        self._method = method
        self._path_qs = path_qs
        self._headers = headers
        self._body = body
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        try:
            self._response = await self._client.request(
                self._method, self._path_qs, self._headers.items(), self._body, self._on_head
            )
        except UpstreamTimeout:
            raise Refusal(
                504,
                "api_error",
                "The upstream API did not answer in time.",
                outcome="upstream_timeout",
            ) from None
        except UpstreamError as exc:
            raise Refusal(
                502,
                "api_error",
                f"The upstream API could not be reached ({exc}).",
                outcome="upstream_unreachable",
            ) from None
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            self._response.release()
