"""Unit tests for the proxy's pure parts: hop-by-hop stripping, upstream headers and URL."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import LimitSettings, UpstreamSettings
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from gateway.proxy import (
    HOP_BY_HOP,
    BodyTooLarge,
    CappedBody,
    Forwarder,
    classify_upstream_error,
    strip_hop_by_hop,
    upstream_host_header,
    upstream_request_headers,
    upstream_url,
)

Pairs = Sequence[tuple[str, str]]


def proxy(pairs: Pairs) -> CIMultiDictProxy[str]:
    """Headers as aiohttp hands them over: a read-only, case-insensitive multidict."""
    return CIMultiDictProxy(CIMultiDict(pairs))


# ---------------------------------------------------------------- strip_hop_by_hop

STRIP_CASES: dict[str, tuple[Pairs, Pairs]] = {
    "no hop-by-hop headers: all kept, in order": (
        [("Accept", "*/*"), ("X-A", "1"), ("Cookie", "a=b")],
        [("Accept", "*/*"), ("X-A", "1"), ("Cookie", "a=b")],
    ),
    "every standard hop-by-hop header dropped": (
        [
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Proxy-Connection", "keep-alive"),
            ("X-End", "kept"),
        ],
        [("X-End", "kept")],
    ),
    "names matched case-insensitively": (
        [("connection", "close"), ("TRANSFER-ENCODING", "chunked"), ("x-end", "1")],
        [("x-end", "1")],
    ),
    "a header named in Connection is dropped": (
        [("Connection", "X-Hop"), ("X-Hop", "secret"), ("X-End", "1")],
        [("X-End", "1")],
    ),
    "Connection tokens: list, spaces, case, empty items, several Connection headers": (
        [
            ("Connection", " x-one ,,X-TWO"),
            ("Connection", "x-three"),
            ("X-One", "1"),
            ("X-Two", "2"),
            ("X-Three", "3"),
            ("X-Four", "4"),
        ],
        [("X-Four", "4")],
    ),
    "a repeated Connection-named header is dropped in every copy": (
        [("Connection", "x-hop"), ("X-Hop", "a"), ("X-Hop", "b")],
        [],
    ),
    "repeated end-to-end headers kept apart and in order": (
        [("Set-Cookie", "a=1"), ("Connection", "close"), ("Set-Cookie", "b=2"), ("X", "y")],
        [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X", "y")],
    ),
    "Content-Length is end-to-end and kept": (
        [("Content-Length", "12"), ("Keep-Alive", "max=3")],
        [("Content-Length", "12")],
    ),
}


@pytest.mark.parametrize(("given", "expected"), STRIP_CASES.values(), ids=STRIP_CASES.keys())
def test_strip_hop_by_hop(given: Pairs, expected: Pairs) -> None:
    assert list(strip_hop_by_hop(proxy(given)).items()) == list(expected)


def test_strip_hop_by_hop_leaves_its_input_alone() -> None:
    headers = CIMultiDict([("Connection", "x-hop"), ("X-Hop", "1"), ("TE", "trailers")])
    strip_hop_by_hop(headers)
    assert list(headers.items()) == [("Connection", "x-hop"), ("X-Hop", "1"), ("TE", "trailers")]


def test_hop_by_hop_set_is_the_rfc_list() -> None:
    assert {name.lower() for name in HOP_BY_HOP} == {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }


# --------------------------------------------------------- upstream_request_headers

UPSTREAM = "10.0.0.5:9000"


def build(
    pairs: Pairs, *, peer: str | None = "198.51.100.9", scheme: str = "http", preserve: bool = False
) -> CIMultiDict[str]:
    return upstream_request_headers(
        proxy(pairs), peer=peer, scheme=scheme, upstream_host=UPSTREAM, preserve_host=preserve
    )


XFF_CASES: dict[str, tuple[Pairs, str | None, list[str]]] = {
    "no prior X-Forwarded-For: the peer alone": ([], "198.51.100.9", ["198.51.100.9"]),
    "prior value: the peer appended": (
        [("X-Forwarded-For", "203.0.113.7")],
        "198.51.100.9",
        ["203.0.113.7, 198.51.100.9"],
    ),
    "prior list kept verbatim, peer appended": (
        [("X-Forwarded-For", "203.0.113.7,  192.0.2.1")],
        "198.51.100.9",
        ["203.0.113.7,  192.0.2.1, 198.51.100.9"],
    ),
    "several prior headers folded into one, in order": (
        [("X-Forwarded-For", "203.0.113.7"), ("x-forwarded-for", "192.0.2.1")],
        "198.51.100.9",
        ["203.0.113.7, 192.0.2.1, 198.51.100.9"],
    ),
    "IPv6 peer appended as is": ([("X-Forwarded-For", "203.0.113.7")], "::1", ["203.0.113.7, ::1"]),
    "no peer (unix socket): prior value untouched": (
        [("X-Forwarded-For", "203.0.113.7")],
        None,
        ["203.0.113.7"],
    ),
}


@pytest.mark.parametrize(("given", "peer", "expected"), XFF_CASES.values(), ids=XFF_CASES.keys())
def test_x_forwarded_for(given: Pairs, peer: str | None, expected: list[str]) -> None:
    assert build(given, peer=peer).getall("X-Forwarded-For") == expected


HOST_CASES: dict[str, tuple[Pairs, bool, str, str | None]] = {
    "Host replaced by the upstream's": (
        [("Host", "api.example.com")],
        False,
        UPSTREAM,
        "api.example.com",
    ),
    "preserve_host keeps the client's Host": (
        [("Host", "api.example.com")],
        True,
        "api.example.com",
        "api.example.com",
    ),
    "preserve_host without a client Host falls back to the upstream's": ([], True, UPSTREAM, None),
    "X-Forwarded-Host is the client's Host, replacing a client-sent one": (
        [("Host", "api.example.com:8443"), ("X-Forwarded-Host", "evil.example")],
        False,
        UPSTREAM,
        "api.example.com:8443",
    ),
    "no client Host: a client-sent X-Forwarded-Host is dropped": (
        [("X-Forwarded-Host", "evil.example")],
        False,
        UPSTREAM,
        None,
    ),
}


@pytest.mark.parametrize(
    ("given", "preserve", "host", "forwarded_host"), HOST_CASES.values(), ids=HOST_CASES.keys()
)
def test_host_and_x_forwarded_host(
    given: Pairs, preserve: bool, host: str, forwarded_host: str | None
) -> None:
    out = build(given, preserve=preserve)
    assert out.getall("Host") == [host]
    assert out.getall("X-Forwarded-Host", []) == ([forwarded_host] if forwarded_host else [])


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_x_forwarded_proto_is_the_scheme_the_gateway_saw(scheme: str) -> None:
    out = build([("X-Forwarded-Proto", "gopher"), ("x-forwarded-proto", "ftp")], scheme=scheme)
    assert out.getall("X-Forwarded-Proto") == [scheme]


def test_request_headers_drop_hop_by_hop_and_expect_keep_the_rest() -> None:
    out = build(
        [
            ("Host", "api.example.com"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("TE", "trailers"),
            ("Expect", "100-continue"),
            ("Content-Length", "3"),
            ("Accept-Encoding", "gzip"),
            ("X-Device-Id", "dev-1"),
            ("X-Multi", "a"),
            ("X-Multi", "b"),
        ]
    )
    assert list(out.items()) == [
        ("Host", UPSTREAM),
        ("Content-Length", "3"),
        ("Accept-Encoding", "gzip"),
        ("X-Device-Id", "dev-1"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
        ("X-Forwarded-For", "198.51.100.9"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "api.example.com"),
    ]


# ------------------------------------------------------------------- upstream_url

ORIGIN = "http://127.0.0.1:9000"

URL_CASES: dict[str, str] = {
    "plain path": "/api/v1/things",
    "root": "/",
    "double slash that looks like an authority": "//evil.example/x",
    "encoded dot segments": "/%2e%2e/admin",
    "literal dot segments": "/a/../b/./c",
    "encoded slash, semicolon, NUL in query": "/a%2Fb;c?x=%00",
    "invalid percent escape": "/%zz/%",
    "non-UTF-8 escapes": "/%ff%fe",
    "lower- and upper-case escapes kept as sent": "/%7e%7E",
    "query kept as sent": "/x?b=2&a=1&a=3&empty=&=odd&plus=a+b&sp=%20",
    "at sign and colon in path": "/user@evil.example:80/x",
    "backslashes": "/\\\\evil.example\\x",
}


@pytest.mark.parametrize("raw", URL_CASES.values(), ids=URL_CASES.keys())
def test_upstream_url_is_origin_plus_raw_target(raw: str) -> None:
    url = upstream_url(ORIGIN, raw)
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 9000)
    assert url.raw_path_qs == raw


def test_upstream_url_loses_only_an_empty_query_marker() -> None:
    # A known limit of yarl/aiohttp: "/x?" and "/x" are the same URL to them, so the upstream
    # gets "/x". A random search over the path and query alphabet found no other change.
    assert upstream_url(ORIGIN, "/x?").raw_path_qs == "/x"
    assert upstream_url(ORIGIN, "/x??").raw_path_qs == "/x??"


BAD_TARGETS: dict[str, str] = {
    "absolute-form": "http://evil.example/x",
    "asterisk-form": "*",
    "empty": "",
    "authority-form": "evil.example:443",
    "fragment": "/a#frag",
}


@pytest.mark.parametrize("raw", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_upstream_url_refuses_targets_that_are_not_origin_form(raw: str) -> None:
    with pytest.raises(ValueError, match="origin-form"):
        upstream_url(ORIGIN, raw)


HOST_HEADER_CASES: dict[str, tuple[str, str]] = {
    "explicit port": ("http://127.0.0.1:9000", "127.0.0.1:9000"),
    "default http port omitted": ("http://example.com:80", "example.com"),
    "default https port omitted": ("https://example.com:443", "example.com"),
    "no port": ("https://example.com", "example.com"),
    "IPv6 bracketed": ("https://[::1]:8443", "[::1]:8443"),
    "IDN as punycode": ("http://bücher.example", "xn--bcher-kva.example"),
}


@pytest.mark.parametrize(
    ("origin", "expected"), HOST_HEADER_CASES.values(), ids=HOST_HEADER_CASES.keys()
)
def test_upstream_host_header(origin: str, expected: str) -> None:
    assert upstream_host_header(origin) == expected


# -------------------------------------------------------- classify_upstream_error


REASONS: dict[type[UpstreamError], tuple[int, str]] = {
    UpstreamUnreachable: (502, "Upstream unreachable"),
    UpstreamTimeout: (504, "Upstream timed out"),
    UpstreamError: (502, "Invalid upstream response"),
}

CLASSIFY_CASES: dict[str, tuple[BaseException, bool, type[UpstreamError]]] = {
    "refused": (ConnectionRefusedError(111, "refused"), False, UpstreamUnreachable),
    "reset": (ConnectionResetError(104, "reset"), False, UpstreamUnreachable),
    "aiohttp OS error": (aiohttp.ClientOSError(113, "no route"), False, UpstreamUnreachable),
    "closed before answering": (aiohttp.ServerDisconnectedError(), False, UpstreamUnreachable),
    "connect timeout is unreachable, not a timeout": (
        aiohttp.ConnectionTimeoutError(),
        False,
        UpstreamUnreachable,
    ),
    "read timeout before headers": (aiohttp.SocketTimeoutError(), False, UpstreamTimeout),
    "deadline passed": (TimeoutError(), True, UpstreamTimeout),
    "deadline wins over the error it interrupted": (ConnectionResetError(), True, UpstreamTimeout),
    "malformed answer": (
        aiohttp.ClientResponseError(None, (), status=400, message="bad status line"),  # type: ignore[arg-type]
        False,
        UpstreamError,
    ),
}


@pytest.mark.parametrize(
    ("exc", "expired", "kind"), CLASSIFY_CASES.values(), ids=CLASSIFY_CASES.keys()
)
def test_classify_upstream_error(
    exc: BaseException, expired: bool, kind: type[UpstreamError]
) -> None:
    failure = classify_upstream_error(exc, deadline_expired=expired)
    assert type(failure) is kind
    assert (failure.status, str(failure)) == REASONS[kind]


# --------------------------------------------------------------------- CappedBody


class FakeContent:
    """Hands out prepared chunks like StreamReader.readany, then b"" (end of body)."""

    def __init__(self, chunks: list[bytes], fail: BaseException | None = None) -> None:
        self.chunks = list(chunks)
        self.fail = fail

    async def readany(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.fail is not None:
            raise self.fail
        return b""


async def drain(body: CappedBody) -> list[bytes]:
    return [chunk async for chunk in body]


async def test_capped_body_passes_a_body_up_to_the_limit_unchanged() -> None:
    body = CappedBody(FakeContent([b"abc", b"de", b"fghij"]), limit=10)  # type: ignore[arg-type]
    assert await drain(body) == [b"abc", b"de", b"fghij"]
    assert not body.overflowed and not body.client_failed


async def test_capped_body_stops_before_yielding_the_chunk_that_passes_the_limit() -> None:
    body = CappedBody(FakeContent([b"abcde", b"fghij", b"k", b"never"]), limit=10)  # type: ignore[arg-type]
    seen: list[bytes] = []
    with pytest.raises(BodyTooLarge):
        async for chunk in body:
            seen.append(chunk)
    assert seen == [b"abcde", b"fghij"]
    assert body.overflowed and not body.client_failed


async def test_capped_body_flags_a_client_that_broke_off() -> None:
    body = CappedBody(FakeContent([b"abc"], fail=ConnectionResetError()), limit=10)  # type: ignore[arg-type]
    with pytest.raises(ConnectionResetError):
        await drain(body)
    assert body.client_failed and not body.overflowed


# ------------------------------------------------------------------ Forwarder life


async def test_forwarder_start_is_idempotent_and_close_releases_the_session() -> None:
    forwarder = Forwarder(UpstreamSettings(), LimitSettings())
    await forwarder.start()
    session = forwarder._session
    assert session is not None
    await forwarder.start()
    assert forwarder._session is session
    await forwarder.close()
    assert session.closed
    await forwarder.close()


async def test_forwarder_session_never_decompresses_stores_cookies_or_reads_env() -> None:
    forwarder = Forwarder(
        UpstreamSettings(max_connections=7, connect_timeout=0.25, timeout=3.0), LimitSettings()
    )
    await forwarder.start()
    session = forwarder._session
    assert session is not None
    try:
        assert session.auto_decompress is False
        assert session.trust_env is False
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        assert {h.lower() for h in session.skip_auto_headers} == {
            "accept",
            "accept-encoding",
            "content-type",
            "user-agent",
        }
        assert session.connector is not None and session.connector.limit == 7
        assert session.timeout.total is None
        assert session.timeout.connect == session.timeout.sock_connect == 0.25
    finally:
        await forwarder.close()
    await asyncio.sleep(0)
