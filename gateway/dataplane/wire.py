"""HTTP/1.1 on the wire (pure): header filtering, message heads, framing, own answers.

Headers travel as the raw `(name, value)` byte pairs the parser saw, so what the client or
the upstream sent is forwarded byte for byte; names are lower-cased only to compare them.
"""

from __future__ import annotations

import http
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Final

from gateway.envelope import envelope

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection that some clients still send.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request headers the gateway writes itself: framing is its own, and the forwarding
# headers are rebuilt; Expect is answered by the gateway (it sends 100 Continue itself).
_REQUEST_OWN: Final = frozenset(
    {b"content-length", b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
     b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)  # fmt: skip
_REQUEST_SKIP: Final = HOP_BY_HOP | _REQUEST_OWN
# What a client may say about an earlier hop. From a trusted proxy (server.trusted_proxies)
# they are passed on (its X-Forwarded-For is extended); from anyone else they are replaced
# by what the gateway saw, or dropped, so that no client can tell the upstream who it is.
_FORWARDING: Final = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)
# `95 in name` (the byte "_") is a memchr: `b"_" in name` first tries the argument as an
# integer and raises and clears a TypeError inside bytes.__contains__ (1,800 instructions).
_UNDERSCORE: Final = 95
_PASSED_WHEN_TRUSTED: Final = frozenset(
    {b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)
# The gateway re-frames every answer: the upstream's length goes, with the hop-by-hop ones.
_RESPONSE_SKIP: Final = HOP_BY_HOP | {b"content-length"}
# Connection tokens that name nothing more to drop than HOP_BY_HOP does already.
_ALWAYS_DROPPED: Final = HOP_BY_HOP | {b"close"}

# Connection values that name nothing to drop, as senders spell them.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})

CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

_REASONS: Final = {s.value: s.phrase.encode() for s in http.HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of a status code (b"Unknown" for unlisted codes)."""
    return _REASONS.get(status, b"Unknown")


def connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The lower-cased header names listed in every Connection header (hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(_tokens(value))
    return frozenset(tokens)


def _tokens(value: bytes) -> list[bytes]:
    return [t for t in (t.strip().lower() for t in value.split(b",")) if t]


def _named(value: bytes, named: frozenset[bytes] | None) -> frozenset[bytes] | None:
    """Add the headers one Connection value names to `named`, beyond those always dropped."""
    if value in _PLAIN_CONNECTION:
        return named  # the usual `keep-alive` or `close`: nothing to split
    extra = [t for t in _tokens(value) if t not in _ALWAYS_DROPPED]
    if not extra:
        return named  # only `close` / `keep-alive` tokens: nothing more to drop
    return (named or frozenset()).union(extra)


def request_head(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    host: bytes,
    peer: bytes,
    scheme: bytes,
    preserve_host: bool,
    content_length: int | None,
    chunked: bool,
    trusted: bool = False,
    identity: frozenset[bytes] = frozenset(),
) -> bytes:
    """The request head sent upstream: method, raw target, end-to-end headers, our own.

    `identity` (lower-cased names of the device headers the request was enforced by) are
    never hop-by-hop, whatever a Connection header says; their lookalikes (the same name
    with `_` for `-`, which CGI-style servers read as the same header) are dropped, as are
    the forwarding headers'. `trusted`: the peer is a trusted proxy, whose forwarding
    headers are passed on; anyone else's are replaced (X-Forwarded-*) or dropped.
    """
    # One pass over the headers: the forwarding ones are read, the rest forwarded unless
    # hop-by-hop, rebuilt here, or a lookalike.
    client_host = b""
    forwarded: list[bytes] = []
    passed: frozenset[bytes] = frozenset()  # forwarding headers a trusted proxy set
    lines = [method + b" " + target + b" HTTP/1.1", b""]
    named: frozenset[bytes] | None = None
    for header in headers:
        lower = header[0].lower()
        if lower in _REQUEST_SKIP:
            if lower == b"host":
                client_host = header[1]
            elif lower == b"x-forwarded-for":
                if trusted:
                    forwarded.append(header[1])
            elif lower == b"connection":
                named = _named(header[1], named)
            elif trusted and lower in _PASSED_WHEN_TRUSTED:
                lines.append(b": ".join(header))
                passed = passed | {lower}
            continue
        if _UNDERSCORE in lower and _lookalike(lower, identity):
            continue
        lines.append(b": ".join(header))  # one join costs less than two concatenations
    if named:
        named = named - identity
    if named:
        # Rare: a Connection header naming other headers, which are hop-by-hop too.
        del lines[2:]
        for header in headers:
            lower = header[0].lower()
            if lower in named or (_UNDERSCORE in lower and _lookalike(lower, identity)):
                continue
            if lower not in _REQUEST_SKIP or (trusted and lower in _PASSED_WHEN_TRUSTED):
                lines.append(b": ".join(header))
    lines[1] = b"Host: " + (client_host if preserve_host and client_host else host)
    forwarded.append(peer)
    lines.append(b"X-Forwarded-For: " + b", ".join(forwarded))
    if b"x-forwarded-proto" not in passed:
        lines.append(b"X-Forwarded-Proto: " + scheme)
    if client_host and b"x-forwarded-host" not in passed:
        lines.append(b"X-Forwarded-Host: " + client_host)
    if content_length is not None:
        lines.append(b"Content-Length: %d" % content_length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)


def _lookalike(lower: bytes, identity: frozenset[bytes]) -> bool:
    """`X_Device_Id` for `x-device-id`: a name only an underscore keeps from one we vouch for."""
    dashed = lower.replace(b"_", b"-")
    return dashed in identity or dashed in _FORWARDING


def response_head(
    status: int,
    reason: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    extra: Mapping[str, str] | None,
    *,
    content_length: int | None,
    chunked: bool,
    keep_alive: bool,
    http11: bool = True,
) -> bytes:
    """The response head sent to the client, from the upstream's raw headers in one pass.

    Hop-by-hop headers, those a Connection header names, and the framing are dropped (the
    gateway re-frames); `extra` (the rate-limit headers) replaces its namesakes, any case.
    """
    lines = [b"HTTP/1.1 %d " % status + (reason or reason_phrase(status))]
    drop = _response_drop(tuple(extra)) if extra else _RESPONSE_SKIP
    named: frozenset[bytes] | None = None
    for header in headers:
        lower = header[0].lower()
        if lower in drop:
            if lower == b"connection":
                named = _named(header[1], named)
            continue
        lines.append(b": ".join(header))
    if named:
        # Rare: a Connection header naming other headers, which are hop-by-hop too.
        dropped = drop | named
        del lines[1:]
        lines.extend(b": ".join(h) for h in headers if h[0].lower() not in dropped)
    if extra:
        lines.append("\r\n".join([f"{k}: {v}" for k, v in extra.items()]).encode())
    if content_length is not None:
        lines.append(b"Content-Length: %d" % content_length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked")
    lines.extend(_connection(keep_alive, http11))
    return CRLF.join(lines) + CRLF + CRLF


@lru_cache(maxsize=64)
def _response_drop(names: tuple[str, ...]) -> frozenset[bytes]:
    """What a response head drops when `names` are added (the rate-limit set repeats)."""
    return _RESPONSE_SKIP | {n.lower().encode() for n in names}


def _connection(keep_alive: bool, http11: bool) -> tuple[bytes, ...]:
    """The Connection header: close when closing; keep-alive when an HTTP/1.0 client stays."""
    if not keep_alive:
        return (b"Connection: close",)
    return () if http11 else (b"Connection: keep-alive",)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (nothing for no data: an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n" % len(data) + data + CRLF


def envelope_answer(
    status: int,
    reason: str,
    extra: Mapping[str, str] | None = None,
    *,
    keep_alive: bool = True,
    http11: bool = True,
    date: bytes = b"",
    head_only: bool = False,
) -> bytes:
    """A complete answer the gateway makes itself: `{"status": false, "result": reason}`."""
    body = envelope(False, reason)
    lines = [b"HTTP/1.1 %d " % status + reason_phrase(status)]
    if date:
        lines.append(b"Date: " + date)
    lines.append(b"Content-Type: application/json")
    lines.append(b"Content-Length: %d" % len(body))
    if extra:
        lines.extend(k.encode() + b": " + v.encode() for k, v in extra.items())
    lines.extend(_connection(keep_alive, http11))
    head = CRLF.join(lines) + CRLF + CRLF
    return head if head_only else head + body
