"""Unit tests for gateway.dataplane.wire: the data plane's pure HTTP/1.1 bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import httptools
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import UpstreamSettings
from gateway.dataplane import wire
from gateway.dataplane.upstream import UpstreamPool

Pairs = Sequence[tuple[bytes, bytes]]


def split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A head's first line and its header lines as (name, value) pairs, exactly as written."""
    assert head.endswith(b"\r\n\r\n")
    first, *lines = head[:-4].split(b"\r\n")
    pairs = []
    for line in lines:
        name, sep, value = line.partition(b": ")
        assert sep, line
        pairs.append((name, value))
    return first, pairs


def values(pairs: Pairs, name: bytes) -> list[bytes]:
    return [v for n, v in pairs if n.lower() == name.lower()]


# ------------------------------------------------------------- hop-by-hop headers


def test_hop_by_hop_set_is_the_rfc_list_plus_proxy_connection() -> None:
    assert {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    } == wire.HOP_BY_HOP


TOKEN_CASES: dict[str, tuple[Pairs, set[bytes]]] = {
    "no Connection header": ([(b"Accept", b"*/*")], set()),
    "one token, lower-cased": ([(b"Connection", b"Close")], {b"close"}),
    "list with spaces and empty items": (
        [(b"Connection", b" x-one ,,X-TWO , ")],
        {b"x-one", b"x-two"},
    ),
    "several Connection headers, any case of the name": (
        [(b"Connection", b"x-one"), (b"CONNECTION", b"x-two"), (b"connection", b"x-three")],
        {b"x-one", b"x-two", b"x-three"},
    ),
}


@pytest.mark.parametrize(("given_", "expected"), TOKEN_CASES.values(), ids=TOKEN_CASES.keys())
def test_connection_tokens(given_: Pairs, expected: set[bytes]) -> None:
    assert wire.connection_tokens(given_) == expected


END_TO_END_CASES: dict[str, tuple[Pairs, Pairs]] = {
    "no hop-by-hop headers: all kept, in order, bytes untouched": (
        [(b"Accept", b"*/*"), (b"x-a", b"1"), (b"Cookie", b"a=b"), (b"X-Raw", b"caf\xe9 \x80")],
        [(b"Accept", b"*/*"), (b"x-a", b"1"), (b"Cookie", b"a=b"), (b"X-Raw", b"caf\xe9 \x80")],
    ),
    "every standard hop-by-hop header dropped": (
        [
            (b"Connection", b"keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Proxy-Authorization", b"Basic eDp5"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Checksum"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Upgrade", b"websocket"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"X-End", b"kept"),
        ],
        [(b"X-End", b"kept")],
    ),
    "names matched case-insensitively": (
        [(b"connection", b"close"), (b"TRANSFER-ENCODING", b"chunked"), (b"x-end", b"1")],
        [(b"x-end", b"1")],
    ),
    "a header named in Connection is dropped": (
        [(b"Connection", b"X-Hop"), (b"X-Hop", b"secret"), (b"X-End", b"1")],
        [(b"X-End", b"1")],
    ),
    "Connection names matched case-insensitively both ways": (
        [(b"Connection", b"X-HOP"), (b"x-hop", b"1"), (b"X-Hop", b"2"), (b"X-End", b"1")],
        [(b"X-End", b"1")],
    ),
    "Connection tokens: list, spaces, case, empty items, several Connection headers": (
        [
            (b"Connection", b" x-one ,,X-TWO"),
            (b"Connection", b"x-three"),
            (b"X-One", b"1"),
            (b"X-Two", b"2"),
            (b"X-Three", b"3"),
            (b"X-Four", b"4"),
        ],
        [(b"X-Four", b"4")],
    ),
    "a named header that comes before its Connection header is dropped too": (
        [(b"X-Hop", b"a"), (b"Connection", b"x-hop"), (b"X-End", b"1")],
        [(b"X-End", b"1")],
    ),
    "a repeated Connection-named header is dropped in every copy": (
        [(b"Connection", b"x-hop"), (b"X-Hop", b"a"), (b"X-Hop", b"b")],
        [],
    ),
    "repeated end-to-end headers kept apart and in order": (
        [(b"Set-Cookie", b"a=1"), (b"Connection", b"close"), (b"Set-Cookie", b"b=2"), (b"X", b"y")],
        [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X", b"y")],
    ),
}


@pytest.mark.parametrize(
    ("given_", "expected"), END_TO_END_CASES.values(), ids=END_TO_END_CASES.keys()
)
def test_end_to_end_headers_of_a_response(given_: Pairs, expected: Pairs) -> None:
    _, pairs = response(given_)
    assert pairs == list(expected)


def test_response_head_leaves_its_input_alone() -> None:
    headers = [(b"Connection", b"x-hop"), (b"X-Hop", b"1"), (b"Content-Length", b"1")]
    before = list(headers)
    _, pairs = response(headers, {"X-End": "2"})
    assert pairs == [(b"X-End", b"2")]
    assert headers == before


RESPONSE_HEADER_CASES: dict[str, tuple[Pairs, Pairs]] = {
    "repeated Set-Cookie kept apart, in order": (
        [(b"Set-Cookie", b"a=1; Path=/"), (b"Set-Cookie", b"b=2"), (b"Set-Cookie", b"c=3, d=4")],
        [(b"Set-Cookie", b"a=1; Path=/"), (b"Set-Cookie", b"b=2"), (b"Set-Cookie", b"c=3, d=4")],
    ),
    "framing dropped (the gateway re-frames)": (
        [(b"Content-Length", b"12"), (b"Transfer-Encoding", b"chunked"), (b"ETag", b'"v1"')],
        [(b"ETag", b'"v1"')],
    ),
    "hop-by-hop and Connection-named dropped": (
        [
            (b"Connection", b"X-Hop-Resp, keep-alive"),
            (b"X-Hop-Resp", b"secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Upgrade", b"h2c"),
            (b"Trailer", b"X-Sum"),
            (b"X-End", b"kept"),
        ],
        [(b"X-End", b"kept")],
    ),
    "Content-Encoding and the upstream's own Server and Date kept": (
        [(b"Content-Encoding", b"gzip"), (b"Server", b"origin"), (b"Date", b"x")],
        [(b"Content-Encoding", b"gzip"), (b"Server", b"origin"), (b"Date", b"x")],
    ),
}


@pytest.mark.parametrize(
    ("given_", "expected"), RESPONSE_HEADER_CASES.values(), ids=RESPONSE_HEADER_CASES.keys()
)
def test_response_headers(given_: Pairs, expected: Pairs) -> None:
    _, pairs = response(given_)
    assert pairs == list(expected)


# ------------------------------------------------------------------ request head

UPSTREAM = b"10.0.0.5:9000"
PEER = b"198.51.100.9"


def request(
    headers: Pairs = (),
    *,
    method: bytes = b"GET",
    target: bytes = b"/",
    peer: bytes = PEER,
    scheme: bytes = b"http",
    preserve_host: bool = False,
    content_length: int | None = None,
    chunked: bool = False,
    trusted: bool = False,
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return split_head(
        wire.request_head(
            method,
            target,
            headers,
            host=UPSTREAM,
            peer=peer,
            scheme=scheme,
            preserve_host=preserve_host,
            content_length=content_length,
            chunked=chunked,
            trusted=trusted,
            identity=IDENTITY,
        )
    )


# The device headers' names as the data plane passes them (lower-cased, from the config).
IDENTITY = frozenset({b"x-device-id", b"x-app-name", b"x-app-version", b"x-os-name",
                      b"x-os-version", b"x-device-manufacturer", b"x-device-model"})  # fmt: skip


RAW_TARGETS: dict[str, bytes] = {
    "plain path": b"/api/v1/things",
    "root": b"/",
    "double slash that looks like an authority": b"//evil.example/x",
    "encoded dot segments": b"/%2e%2e/admin",
    "literal dot segments": b"/a/../b/./c",
    "encoded slash, semicolon, NUL in query": b"/a%2Fb;c?x=%00",
    "invalid percent escape": b"/%zz/%",
    "non-UTF-8 escapes": b"/%ff%fe",
    "lower- and upper-case escapes kept as sent": b"/%7e%7E",
    "query kept as sent": b"/x?b=2&a=1&a=3&empty=&=odd&plus=a+b&sp=%20",
    "empty query marker kept (aiohttp's client dropped it)": b"/x?",
    "two query markers": b"/x??",
    "at sign and colon in path": b"/user@evil.example:80/x",
    "backslashes": b"/\\\\evil.example\\x",
}


@pytest.mark.parametrize("target", RAW_TARGETS.values(), ids=RAW_TARGETS.keys())
def test_request_line_carries_the_raw_target_untouched(target: bytes) -> None:
    first, _ = request(target=target, method=b"PATCH")
    assert first == b"PATCH " + target + b" HTTP/1.1"


XFF_CASES: dict[str, tuple[Pairs, bytes, bool, list[bytes]]] = {
    "no prior X-Forwarded-For: the peer alone": ([], PEER, False, [PEER]),
    "an untrusted client's value is replaced, never extended": (
        [(b"X-Forwarded-For", b"203.0.113.7")],
        PEER,
        False,
        [PEER],
    ),
    "every untrusted value replaced, any case": (
        [(b"X-Forwarded-For", b"203.0.113.7"), (b"x-forwarded-for", b"192.0.2.1")],
        PEER,
        False,
        [PEER],
    ),
    "a trusted proxy's value: the peer appended": (
        [(b"X-Forwarded-For", b"203.0.113.7")],
        PEER,
        True,
        [b"203.0.113.7, " + PEER],
    ),
    "a trusted proxy's list kept verbatim, peer appended": (
        [(b"X-Forwarded-For", b"203.0.113.7,  192.0.2.1")],
        PEER,
        True,
        [b"203.0.113.7,  192.0.2.1, " + PEER],
    ),
    "several trusted headers, any case, folded into one in order": (
        [(b"X-Forwarded-For", b"203.0.113.7"), (b"x-forwarded-for", b"192.0.2.1")],
        PEER,
        True,
        [b"203.0.113.7, 192.0.2.1, " + PEER],
    ),
    "IPv6 peer appended as is": (
        [(b"X-Forwarded-For", b"203.0.113.7")],
        b"::1",
        True,
        [b"203.0.113.7, ::1"],
    ),
}


@pytest.mark.parametrize(
    ("given_", "peer", "trusted", "expected"), XFF_CASES.values(), ids=XFF_CASES.keys()
)
def test_x_forwarded_for(given_: Pairs, peer: bytes, trusted: bool, expected: list[bytes]) -> None:
    _, pairs = request(given_, peer=peer, trusted=trusted)
    assert values(pairs, b"X-Forwarded-For") == expected


CLAIMS: Final[Pairs] = [
    (b"Forwarded", b"for=203.0.113.7;proto=https"),
    (b"X-Real-IP", b"203.0.113.7"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"shop.example"),
    (b"Host", b"gw.internal"),
]


def test_an_untrusted_client_cannot_say_who_it_is() -> None:
    _, pairs = request(CLAIMS)
    assert values(pairs, b"Forwarded") == [] and values(pairs, b"X-Real-IP") == []
    assert values(pairs, b"X-Forwarded-Proto") == [b"http"]
    assert values(pairs, b"X-Forwarded-Host") == [b"gw.internal"]


def test_a_trusted_proxy_says_it_for_its_client() -> None:
    _, pairs = request(CLAIMS, trusted=True)
    assert values(pairs, b"Forwarded") == [b"for=203.0.113.7;proto=https"]
    assert values(pairs, b"X-Real-IP") == [b"203.0.113.7"]
    # The proxy terminated TLS and saw the original Host: its words stand, once each.
    assert values(pairs, b"X-Forwarded-Proto") == [b"https"]
    assert values(pairs, b"X-Forwarded-Host") == [b"shop.example"]


LOOKALIKES: dict[str, bytes] = {
    "the id with underscores": b"X_Device_Id",
    "mixed": b"x-device_id",
    "another identity field": b"X_App_Version",
    "a forwarding header": b"X_Forwarded_For",
    "X-Real-IP": b"X_Real_IP",
}


@pytest.mark.parametrize("name", LOOKALIKES.values(), ids=LOOKALIKES.keys())
@pytest.mark.parametrize("trusted", [False, True])
def test_lookalikes_of_vouched_headers_never_reach_the_upstream(name: bytes, trusted: bool) -> None:
    _, pairs = request([(b"X-Device-Id", b"dev-1"), (name, b"blk-1")], trusted=trusted)
    assert values(pairs, name) == []
    assert values(pairs, b"X-Device-Id") == [b"dev-1"]


def test_an_underscore_elsewhere_is_forwarded() -> None:
    _, pairs = request([(b"X_Custom_Thing", b"1"), (b"Accept_Language", b"fr")])
    assert values(pairs, b"X_Custom_Thing") == [b"1"]
    assert values(pairs, b"Accept_Language") == [b"fr"]


CONNECTION_NAMING: dict[str, bytes] = {
    "the id": b"X-Device-Id",
    "the id, another case": b"x-DEVICE-id",
    "an identity field among others": b"keep-alive, X-App-Name, X-Hop",
}


@pytest.mark.parametrize("value", CONNECTION_NAMING.values(), ids=CONNECTION_NAMING.keys())
def test_a_connection_header_cannot_make_an_identity_header_hop_by_hop(value: bytes) -> None:
    _, pairs = request(
        [
            (b"Connection", value),
            (b"X-Device-Id", b"blk-1"),
            (b"X-App-Name", b"Shop"),
            (b"X-Hop", b"1"),
            (b"X_Device_Id", b"other"),
        ]
    )
    assert values(pairs, b"X-Device-Id") == [b"blk-1"]
    assert values(pairs, b"X-App-Name") == [b"Shop"]
    assert values(pairs, b"X_Device_Id") == []  # the lookalike stays dropped on this path too
    assert values(pairs, b"X-Hop") == ([] if b"X-Hop" in value else [b"1"])


HOST_CASES: dict[str, tuple[Pairs, bool, bytes, bytes | None]] = {
    "Host replaced by the upstream's": (
        [(b"Host", b"api.example.com")],
        False,
        UPSTREAM,
        b"api.example.com",
    ),
    "preserve_host keeps the client's Host": (
        [(b"Host", b"api.example.com")],
        True,
        b"api.example.com",
        b"api.example.com",
    ),
    "preserve_host without a client Host falls back to the upstream's": ([], True, UPSTREAM, None),
    "preserve_host with an empty client Host falls back to the upstream's": (
        [(b"Host", b"")],
        True,
        UPSTREAM,
        None,
    ),
    "X-Forwarded-Host is the client's Host, replacing a client-sent one": (
        [(b"host", b"api.example.com:8443"), (b"X-Forwarded-Host", b"evil.example")],
        False,
        UPSTREAM,
        b"api.example.com:8443",
    ),
    "no client Host: a client-sent X-Forwarded-Host is dropped": (
        [(b"X-Forwarded-Host", b"evil.example")],
        False,
        UPSTREAM,
        None,
    ),
}


@pytest.mark.parametrize(
    ("given_", "preserve", "host", "forwarded_host"), HOST_CASES.values(), ids=HOST_CASES.keys()
)
def test_host_and_x_forwarded_host(
    given_: Pairs, preserve: bool, host: bytes, forwarded_host: bytes | None
) -> None:
    _, pairs = request(given_, preserve_host=preserve)
    assert values(pairs, b"Host") == [host]
    assert values(pairs, b"X-Forwarded-Host") == ([forwarded_host] if forwarded_host else [])


@pytest.mark.parametrize("scheme", [b"http", b"https"])
def test_x_forwarded_proto_is_the_scheme_the_gateway_saw(scheme: bytes) -> None:
    _, pairs = request(
        [(b"X-Forwarded-Proto", b"gopher"), (b"x-forwarded-proto", b"ftp")], scheme=scheme
    )
    assert values(pairs, b"X-Forwarded-Proto") == [scheme]


FRAMING_CASES: dict[str, tuple[Pairs, int | None, bool, list[bytes], list[bytes]]] = {
    "no body: neither header": ([], None, False, [], []),
    "Content-Length": ([], 5, False, [b"5"], []),
    "zero Content-Length is still written": ([], 0, False, [b"0"], []),
    "chunked": ([], None, True, [], [b"chunked"]),
    "Content-Length wins over chunked": ([], 5, True, [b"5"], []),
    "the client's framing headers are never copied": (
        [(b"Content-Length", b"999"), (b"Transfer-Encoding", b"gzip, chunked")],
        None,
        True,
        [],
        [b"chunked"],
    ),
    "a client Content-Length is replaced by the one given": (
        [(b"content-length", b"999")],
        7,
        False,
        [b"7"],
        [],
    ),
}


@pytest.mark.parametrize(
    ("given_", "length", "chunked", "content_length", "transfer_encoding"),
    FRAMING_CASES.values(),
    ids=FRAMING_CASES.keys(),
)
def test_request_framing(
    given_: Pairs,
    length: int | None,
    chunked: bool,
    content_length: list[bytes],
    transfer_encoding: list[bytes],
) -> None:
    _, pairs = request(given_, method=b"POST", content_length=length, chunked=chunked)
    assert values(pairs, b"Content-Length") == content_length
    assert values(pairs, b"Transfer-Encoding") == transfer_encoding


def test_request_head_drops_hop_by_hop_and_expect_and_keeps_the_rest_in_order() -> None:
    first, pairs = request(
        [
            (b"Host", b"api.example.com"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"TE", b"trailers"),
            (b"Expect", b"100-continue"),
            (b"Content-Length", b"3"),
            (b"Accept-Encoding", b"gzip"),
            (b"x-device-id", b"dev-1"),
            (b"X-Multi", b"a"),
            (b"X-Multi", b"b"),
        ],
        method=b"POST",
        target=b"/p?q",
        content_length=3,
    )
    assert first == b"POST /p?q HTTP/1.1"
    assert pairs == [
        (b"Host", UPSTREAM),
        (b"Accept-Encoding", b"gzip"),
        (b"x-device-id", b"dev-1"),
        (b"X-Multi", b"a"),
        (b"X-Multi", b"b"),
        (b"X-Forwarded-For", PEER),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"api.example.com"),
        (b"Content-Length", b"3"),
    ]


HEADER_NAME = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1)
HEADER_VALUE = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127).strip(b" \t")
)
ANY_NAME = st.one_of(
    HEADER_NAME.map(str.encode),
    st.sampled_from(
        [b"Host", b"Connection", b"Content-Length", b"Transfer-Encoding", b"Expect", b"TE",
         b"X-Forwarded-For", b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Upgrade",
         b"Forwarded", b"X-Real-IP", b"X-Device-Id", b"X_Device_Id", b"x_forwarded_for"]
    ),
)  # fmt: skip


@given(
    headers=st.lists(st.tuples(ANY_NAME, HEADER_VALUE), max_size=12),
    length=st.one_of(st.none(), st.integers(0, 10**9)),
    chunked=st.booleans(),
    preserve_host=st.booleans(),
    trusted=st.booleans(),
)
def test_request_head_is_always_one_well_formed_message(
    headers: list[tuple[bytes, bytes]],
    length: int | None,
    chunked: bool,
    preserve_host: bool,
    trusted: bool,
) -> None:
    head = wire.request_head(
        b"PUT",
        b"/a%2F?x",
        headers,
        host=UPSTREAM,
        peer=PEER,
        scheme=b"http",
        preserve_host=preserve_host,
        content_length=length,
        chunked=chunked,
        trusted=trusted,
        identity=IDENTITY,
    )
    seen: list[tuple[bytes, bytes]] = []

    class Collect:
        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name, value))

    parser = httptools.HttpRequestParser(Collect())
    parser.feed_data(head)  # llhttp accepts it: one head, no conflicting framing
    assert parser.get_method() == b"PUT"
    for own in (b"Host", b"X-Forwarded-For"):
        assert len(values(seen, own)) == 1, own
    # A trusted proxy's own X-Forwarded-Proto/-Host are passed on as it sent them.
    if not trusted:
        assert len(values(seen, b"X-Forwarded-Proto")) == 1
        assert len(values(seen, b"X-Forwarded-Host")) <= 1
        assert values(seen, b"Forwarded") == values(seen, b"X-Real-IP") == []
    assert len(values(seen, b"Content-Length")) + len(values(seen, b"Transfer-Encoding")) <= 1
    named = wire.connection_tokens(headers)
    for name, _ in seen:
        lower = name.lower()
        assert lower not in wire.HOP_BY_HOP or lower == b"transfer-encoding"
        assert lower != b"expect"
        assert b"_" not in lower or lower.replace(b"_", b"-") not in IDENTITY
        if lower not in {b"host", b"content-length", b"transfer-encoding"} and not (
            lower.startswith(b"x-forwarded-") or lower in IDENTITY
        ):
            assert lower not in named


# ----------------------------------------------------------------- response head


def response(
    headers: Pairs = (),
    extra: dict[str, str] | None = None,
    *,
    status: int = 200,
    reason: bytes = b"OK",
    content_length: int | None = None,
    chunked: bool = False,
    keep_alive: bool = True,
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return split_head(
        wire.response_head(
            status,
            reason,
            headers,
            extra,
            content_length=content_length,
            chunked=chunked,
            keep_alive=keep_alive,
        )
    )


STATUS_LINE_CASES: dict[str, tuple[int, bytes, bytes]] = {
    "the upstream's reason kept": (200, b"Fine", b"HTTP/1.1 200 Fine"),
    "empty reason: the standard phrase": (404, b"", b"HTTP/1.1 404 Not Found"),
    "unlisted code without a reason": (599, b"", b"HTTP/1.1 599 Unknown"),
}


@pytest.mark.parametrize(
    ("status", "reason", "expected"), STATUS_LINE_CASES.values(), ids=STATUS_LINE_CASES.keys()
)
def test_status_line(status: int, reason: bytes, expected: bytes) -> None:
    first, _ = response(status=status, reason=reason)
    assert first == expected


EXTRA_CASES: dict[str, tuple[Pairs, dict[str, str] | None, Pairs]] = {
    "no extra headers: the upstream's, in order": (
        [(b"Set-Cookie", b"a=1"), (b"X-Up", b"1"), (b"Set-Cookie", b"b=2")],
        None,
        [(b"Set-Cookie", b"a=1"), (b"X-Up", b"1"), (b"Set-Cookie", b"b=2")],
    ),
    "empty extra changes nothing": ([(b"X-Up", b"1")], {}, [(b"X-Up", b"1")]),
    "extra headers appended after the upstream's": (
        [(b"X-Up", b"1")],
        {"RateLimit": '"device";r=4;t=1'},
        [(b"X-Up", b"1"), (b"RateLimit", b'"device";r=4;t=1')],
    ),
    "extra replaces every upstream namesake, any case": (
        [
            (b"x-ratelimit-remaining", b"99"),
            (b"X-Up", b"1"),
            (b"X-RATELIMIT-REMAINING", b"98"),
        ],
        {"X-RateLimit-Remaining": "4"},
        [(b"X-Up", b"1"), (b"X-RateLimit-Remaining", b"4")],
    ),
}


@pytest.mark.parametrize(
    ("upstream", "extra", "expected"), EXTRA_CASES.values(), ids=EXTRA_CASES.keys()
)
def test_response_headers_and_extra(
    upstream: Pairs, extra: dict[str, str] | None, expected: Pairs
) -> None:
    _, pairs = response(upstream, extra)
    assert pairs == list(expected)


RESPONSE_FRAMING_CASES: dict[str, tuple[int | None, bool, bool, Pairs]] = {
    "Content-Length": (1000, False, True, [(b"Content-Length", b"1000")]),
    "chunked": (None, True, True, [(b"Transfer-Encoding", b"chunked")]),
    "no length, not chunked (no body, or read to the close)": (None, False, True, []),
    "Connection: close when not keeping alive": (
        None,
        False,
        False,
        [(b"Connection", b"close")],
    ),
    "length and close together": (
        5,
        False,
        False,
        [(b"Content-Length", b"5"), (b"Connection", b"close")],
    ),
}


@pytest.mark.parametrize(
    ("length", "chunked", "keep_alive", "expected"),
    RESPONSE_FRAMING_CASES.values(),
    ids=RESPONSE_FRAMING_CASES.keys(),
)
def test_response_framing(
    length: int | None, chunked: bool, keep_alive: bool, expected: Pairs
) -> None:
    _, pairs = response(
        [(b"X-Up", b"1")], content_length=length, chunked=chunked, keep_alive=keep_alive
    )
    assert pairs == [(b"X-Up", b"1"), *expected]


# ------------------------------------------------------------------------ chunks

CHUNK_CASES: dict[str, tuple[bytes, bytes]] = {
    "one byte": (b"a", b"1\r\na\r\n"),
    "size in lower-case hex": (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
    "4 KiB": (b"y" * 4096, b"1000\r\n" + b"y" * 4096 + b"\r\n"),
    "CRLF inside the data is data": (b"\r\n0\r\n\r\n", b"7\r\n\r\n0\r\n\r\n\r\n"),
}


@pytest.mark.parametrize(("data", "expected"), CHUNK_CASES.values(), ids=CHUNK_CASES.keys())
def test_chunk(data: bytes, expected: bytes) -> None:
    assert wire.chunk(data) == expected


def test_fixed_pieces() -> None:
    assert wire.LAST_CHUNK == b"0\r\n\r\n"
    assert wire.CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_chunks_parse_back_to_the_data() -> None:
    pieces = [b"first", b"\r\n", b"z" * 70_000]
    body: list[bytes] = []

    class Collect:
        def on_body(self, data: bytes) -> None:
            body.append(data)

    parser = httptools.HttpResponseParser(Collect())
    parser.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    parser.feed_data(b"".join(wire.chunk(p) for p in pieces) + wire.LAST_CHUNK)
    assert b"".join(body) == b"".join(pieces)


# ------------------------------------------------------------------------ answers

ENVELOPE_CASES: dict[str, tuple[int, str]] = {
    "502": (502, "Upstream unreachable"),
    "413": (413, "Request body too large"),
    "a reason that needs JSON escaping": (400, 'Bad request: "quoted" \\ and \u2028'),
    "non-ASCII reason: Content-Length counts bytes": (400, "Ungültiges Gerät é"),
}


@pytest.mark.parametrize(("status", "reason"), ENVELOPE_CASES.values(), ids=ENVELOPE_CASES.keys())
def test_envelope_answer(status: int, reason: str) -> None:
    answer = wire.envelope_answer(status, reason)
    head, body = answer.split(b"\r\n\r\n", 1)
    first, pairs = split_head(head + b"\r\n\r\n")
    assert first == b"HTTP/1.1 %d " % status + wire.reason_phrase(status)
    assert orjson.loads(body) == {"status": False, "result": reason}
    assert values(pairs, b"Content-Length") == [str(len(body)).encode()]
    assert values(pairs, b"Content-Type") == [b"application/json"]
    assert values(pairs, b"Connection") == []
    assert values(pairs, b"Date") == []


def test_envelope_answer_options() -> None:
    full = wire.envelope_answer(
        429,
        "Too many requests",
        {"Retry-After": "2", "RateLimit": '"device";r=0;t=2'},
        keep_alive=False,
        date=b"Mon, 02 Nov 2026 10:00:00 GMT",
    )
    head, body = full.split(b"\r\n\r\n", 1)
    first, pairs = split_head(head + b"\r\n\r\n")
    assert first == b"HTTP/1.1 429 Too Many Requests"
    assert pairs == [
        (b"Date", b"Mon, 02 Nov 2026 10:00:00 GMT"),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Retry-After", b"2"),
        (b"RateLimit", b'"device";r=0;t=2'),
        (b"Connection", b"close"),
    ]


def test_envelope_answer_to_head_is_the_same_head_without_the_body() -> None:
    full = wire.envelope_answer(502, "Upstream unreachable")
    head_only = wire.envelope_answer(502, "Upstream unreachable", head_only=True)
    assert head_only.endswith(b"\r\n\r\n")
    assert full == head_only + orjson.dumps({"status": False, "result": "Upstream unreachable"})


REASON_CASES: dict[str, tuple[int, bytes]] = {
    "200": (200, b"OK"),
    "404": (404, b"Not Found"),
    "431": (431, b"Request Header Fields Too Large"),
    "unlisted": (599, b"Unknown"),
}


@pytest.mark.parametrize(("status", "expected"), REASON_CASES.values(), ids=REASON_CASES.keys())
def test_reason_phrase(status: int, expected: bytes) -> None:
    assert wire.reason_phrase(status) == expected


# ----------------------------------------------- the upstream Host request_head gets

HOST_HEADER_CASES: dict[str, tuple[str, bytes]] = {
    "explicit port": ("http://127.0.0.1:9000", b"127.0.0.1:9000"),
    "default http port omitted": ("http://example.com:80", b"example.com"),
    "default https port omitted": ("https://example.com:443", b"example.com"),
    "no port": ("https://example.com", b"example.com"),
    "IPv6 bracketed": ("https://[::1]:8443", b"[::1]:8443"),
    "IDN as punycode": ("http://bücher.example", b"xn--bcher-kva.example"),
}


@pytest.mark.parametrize(
    ("origin", "expected"), HOST_HEADER_CASES.values(), ids=HOST_HEADER_CASES.keys()
)
def test_upstream_host_header(origin: str, expected: bytes) -> None:
    # UpstreamPool computes the `host` that request_head writes; no connection is opened.
    assert UpstreamPool(UpstreamSettings(url=origin)).host_header == expected
