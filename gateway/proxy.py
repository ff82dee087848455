"""The forwarding handler: one pooled upstream session, bodies streamed both ways.

The header and URL work is pure (`strip_hop_by_hop`, `upstream_request_headers`,
`upstream_url`, `classify_upstream_error`); `Forwarder.forward` does the I/O and is the one
place in the data plane where upstream failures become HTTP answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from gateway.config import LimitSettings, UpstreamSettings
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from gateway.responses import REASON_BODY_TOO_LARGE, error

_log = logging.getLogger(__name__)

Headers = CIMultiDict[str] | CIMultiDictProxy[str]

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection that some clients still send.
HOP_BY_HOP: Final = (
    hdrs.CONNECTION,
    hdrs.KEEP_ALIVE,
    hdrs.PROXY_AUTHENTICATE,
    hdrs.PROXY_AUTHORIZATION,
    hdrs.TE,
    hdrs.TRAILER,
    hdrs.TRANSFER_ENCODING,
    hdrs.UPGRADE,
    istr("Proxy-Connection"),
)

# The client would otherwise add these on its own; a proxy must send only what it received.
SKIP_AUTO_HEADERS: Final = frozenset(
    {hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE, hdrs.USER_AGENT}
)

REASON_INVALID_TARGET: Final = "Invalid request target"
REASON_BODY_INCOMPLETE: Final = "Request body could not be read"
REASON_UNREACHABLE: Final = "Upstream unreachable"
REASON_TIMED_OUT: Final = "Upstream timed out"
REASON_BAD_RESPONSE: Final = "Invalid upstream response"


def strip_hop_by_hop(headers: Headers) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop fields, including every one named in Connection."""
    # Copying the multidict and deleting is several times faster than filtering item by item.
    out = headers.copy()
    if hdrs.CONNECTION in headers:
        for value in headers.getall(hdrs.CONNECTION):
            for token in value.split(","):
                name = token.strip()
                if name and name in out:
                    del out[name]
    for name in HOP_BY_HOP:
        if name in out:
            del out[name]
    return out


def upstream_request_headers(
    headers: Headers,
    *,
    peer: str | None,
    scheme: str,
    upstream_host: str,
    preserve_host: bool,
) -> CIMultiDict[str]:
    """The headers to send upstream: end-to-end ones kept, X-Forwarded-* and Host set."""
    out = strip_hop_by_hop(headers)
    # The gateway's own server already answered any 100-continue; asking the upstream again
    # would make the client wait for a 100 that many upstreams never send.
    if hdrs.EXPECT in out:
        del out[hdrs.EXPECT]
    if peer is not None:
        prior = out.popall(hdrs.X_FORWARDED_FOR, None)
        out[hdrs.X_FORWARDED_FOR] = f"{', '.join(prior)}, {peer}" if prior else peer
    out[hdrs.X_FORWARDED_PROTO] = scheme
    client_host = headers.get(hdrs.HOST)
    if client_host:
        out[hdrs.X_FORWARDED_HOST] = client_host
    elif hdrs.X_FORWARDED_HOST in out:
        # Without a Host of its own the client must not choose the forwarded host.
        del out[hdrs.X_FORWARDED_HOST]
    out[hdrs.HOST] = client_host if preserve_host and client_host else upstream_host
    return out


def upstream_url(origin: str, raw_path: str) -> URL:
    """The origin plus the request's raw path and query, byte for byte (never normalised).

    Raises ValueError for a target that is not origin-form: absolute-form would change the
    authority, and a fragment (never valid in a request) would be dropped silently.
    """
    if not raw_path.startswith("/") or "#" in raw_path:
        raise ValueError(f"not an origin-form request target: {raw_path!r}")
    return URL(origin + raw_path, encoded=True)


def upstream_host_header(origin: str) -> str:
    """The Host value for `origin`: host, plus the port when it is not the scheme's default."""
    host = URL(origin).host_port_subcomponent
    if not host:
        raise ValueError(f"upstream url has no host: {origin!r}")
    return host


def classify_upstream_error(exc: BaseException, *, deadline_expired: bool) -> UpstreamError:
    """Map a failure before the response headers to the gateway's upstream error."""
    if deadline_expired or isinstance(exc, aiohttp.SocketTimeoutError):
        return UpstreamTimeout(REASON_TIMED_OUT)
    # Refused, reset, closed early, or the connect timeout (a TimeoutError too, hence first).
    if isinstance(exc, aiohttp.ClientConnectionError):
        return UpstreamUnreachable(REASON_UNREACHABLE)
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(REASON_TIMED_OUT)
    if isinstance(exc, OSError):
        return UpstreamUnreachable(REASON_UNREACHABLE)
    return UpstreamError(REASON_BAD_RESPONSE)


class BodyTooLarge(Exception):
    """The client's body passed limits.max_body_bytes while it was being streamed."""


class CappedBody:
    """The client's body as an async iterator of chunks, cut once it passes `limit` bytes.

    Raising from the iterator makes aiohttp fail the upstream request without writing the
    end of the body (no final chunk, fewer bytes than Content-Length) and close that
    connection, so the upstream never sees a complete request.
    """

    __slots__ = ("_left", "_read", "client_failed", "overflowed")

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self._read = content.readany
        self._left = limit
        self.overflowed = False
        self.client_failed = False

    def __aiter__(self) -> CappedBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._read()
        except Exception:
            self.client_failed = True
            raise
        if not chunk:
            raise StopAsyncIteration
        self._left -= len(chunk)
        if self._left < 0:
            self.overflowed = True
            raise BodyTooLarge
        return chunk


class Forwarder:
    """Forwards requests to the one upstream origin over one pooled ClientSession."""

    def __init__(self, upstream: UpstreamSettings, limits: LimitSettings) -> None:
        self._settings = upstream
        self._origin = upstream.url
        self._upstream_host = upstream_host_header(upstream.url)
        self._preserve_host = upstream.preserve_host
        self._timeout = upstream.timeout
        self._max_body = limits.max_body_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Create the pooled ClientSession (call inside a running loop)."""
        if self._session is not None:
            return
        settings = self._settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.max_connections, limit_per_host=0),
            # No total: a streamed answer (SSE) may run for hours. The deadline for the
            # response headers is an asyncio.timeout in forward(); sock_read bounds silence
            # in the middle of a response body by the same number of seconds.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=settings.connect_timeout,
                sock_connect=settings.connect_timeout,
                sock_read=settings.timeout,
            ),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        """Close the session and its pooled connections."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def forward(
        self, request: web.Request, extra_headers: Mapping[str, str] | None = None
    ) -> web.StreamResponse:
        """Send `request` upstream and stream the answer back, adding `extra_headers` to it."""
        session = self._session
        if session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        try:
            url = upstream_url(self._origin, request.raw_path)
        except ValueError:
            return self._answer(request, 400, REASON_INVALID_TARGET, extra_headers)
        declared = request.content_length
        if declared is not None and declared > self._max_body:
            # Normally refused earlier by the enforce middleware; kept here so the proxy is
            # safe on its own.
            return self._answer(request, 413, REASON_BODY_TOO_LARGE, extra_headers)

        headers = upstream_request_headers(
            request.headers,
            peer=request.remote,
            scheme=request.scheme,
            upstream_host=self._upstream_host,
            preserve_host=self._preserve_host,
        )
        # A Content-Length in `headers` makes aiohttp send the body with that length;
        # without one (the client sent it chunked) aiohttp sends it chunked.
        body = CappedBody(request.content, self._max_body) if request.body_exists else None

        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline:
                upstream = await session.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if body is not None and body.overflowed:
                return self._answer(request, 413, REASON_BODY_TOO_LARGE, extra_headers)
            if body is not None and body.client_failed:
                return self._answer(request, 400, REASON_BODY_INCOMPLETE, extra_headers)
            failure = classify_upstream_error(exc, deadline_expired=deadline.expired())
            _log.warning("%s %s: %s: %r", request.method, self._origin, failure, exc)
            return self._answer(request, failure.status, str(failure), extra_headers)

        return await self._relay(request, upstream, extra_headers)

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        extra_headers: Mapping[str, str] | None,
    ) -> web.StreamResponse:
        """Stream the upstream's answer to the client as it arrives."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=strip_hop_by_hop(upstream.headers),
        )
        if extra_headers:
            response.headers.update(extra_headers)
        complete = False
        try:
            await response.prepare(request)
            read = upstream.content.readany
            while chunk := await read():
                # Each write goes to the socket at once: chunked and SSE bodies are not held.
                await response.write(chunk)
            complete = True
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            transport = request.transport
            if transport is None or transport.is_closing():
                # The client left (every SSE client does, sooner or later).
                _log.debug("%s %s: client left mid-response: %r", request.method, self._origin, exc)
            else:
                # The status line is out: the only honest signal left is a cut connection,
                # never a complete-looking body (or a 504 after a 200).
                _log.warning(
                    "%s %s: upstream broke mid-response: %r", request.method, self._origin, exc
                )
                transport.abort()
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()
        return response

    @staticmethod
    def _answer(
        request: web.Request, status: int, reason: str, extra_headers: Mapping[str, str] | None
    ) -> web.Response:
        """An envelope answer; closes the connection when the client's body was not read."""
        response = error(status, reason, headers=extra_headers)
        if request.body_exists and not request.content.is_eof():
            response.force_close()
        return response


def forwarder_ctx(forwarder: Forwarder) -> Callable[[web.Application], AsyncIterator[None]]:
    """An `app.cleanup_ctx` entry that starts the forwarder and closes it on shutdown."""

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        await forwarder.start()
        try:
            yield
        finally:
            await forwarder.close()

    return ctx
