"""HTTP/1.1 on the wire (pure): header filtering, message heads, framing, own answers.

Headers travel as the raw `(name, value)` byte pairs the parser saw, so what the client or
the upstream sent is forwarded byte for byte; names are lower-cased only to compare them.
"""

from __future__ import annotations

import http
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Final

from gateway.responses import envelope

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
     b"x-forwarded-host"}
)  # fmt: skip
_RESPONSE_OWN: Final = frozenset({b"content-length"})
_REQUEST_SKIP: Final = HOP_BY_HOP | _REQUEST_OWN
# Connection tokens that name nothing more to drop than HOP_BY_HOP does already.
_ALWAYS_DROPPED: Final = HOP_BY_HOP | {b"close"}

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
    extra = [t for t in _tokens(value) if t not in _ALWAYS_DROPPED]
    if not extra:
        return named  # `close` or `keep-alive`: the common case, nothing more to drop
    return (named or frozenset()).union(extra)


def end_to_end(headers: Sequence[tuple[bytes, bytes]], own: frozenset[bytes]) -> RawHeaders:
    """The headers to forward: without hop-by-hop ones, those named in Connection, or `own`."""
    kept: RawHeaders = []
    named: frozenset[bytes] | None = None
    for header in headers:
        lower = header[0].lower()
        if lower in HOP_BY_HOP or lower in own:
            if lower == b"connection":
                named = _named(header[1], named)
            continue
        kept.append(header)
    if named:
        # Rare: a Connection header listing other headers, which are hop-by-hop too.
        return [h for h in kept if h[0].lower() not in named]
    return kept


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
) -> bytes:
    """The request head sent upstream: method, raw target, end-to-end headers, our own."""
    # One pass over the headers: the forwarding ones are read, the rest forwarded unless
    # hop-by-hop or rebuilt here.
    client_host = b""
    forwarded: list[bytes] = []
    lines = [method + b" " + target + b" HTTP/1.1", b""]
    named: frozenset[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in _REQUEST_SKIP:
            if lower == b"host":
                client_host = value
            elif lower == b"x-forwarded-for":
                forwarded.append(value)
            elif lower == b"connection":
                named = _named(value, named)
            continue
        lines.append(name + b": " + value)
    if named:
        # Rare: a Connection header naming other headers, which are hop-by-hop too.
        dropped = _REQUEST_SKIP | named
        del lines[2:]
        lines.extend(n + b": " + v for n, v in headers if n.lower() not in dropped)
    lines[1] = b"Host: " + (client_host if preserve_host and client_host else host)
    forwarded.append(peer)
    lines.append(b"X-Forwarded-For: " + b", ".join(forwarded))
    lines.append(b"X-Forwarded-Proto: " + scheme)
    if client_host:
        lines.append(b"X-Forwarded-Host: " + client_host)
    if content_length is not None:
        lines.append(b"Content-Length: %d" % content_length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)


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
    """The response head sent to the client; `extra` (rate-limit headers) replaces namesakes."""
    lines = [b"HTTP/1.1 %d " % status + (reason or reason_phrase(status))]
    if extra:
        replaced = _lower_names(tuple(extra))
        lines.extend(n + b": " + v for n, v in headers if n.lower() not in replaced)
        lines.extend(k.encode() + b": " + v.encode() for k, v in extra.items())
    else:
        lines.extend(n + b": " + v for n, v in headers)
    if content_length is not None:
        lines.append(b"Content-Length: %d" % content_length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked")
    lines.extend(_connection(keep_alive, http11))
    return CRLF.join(lines) + CRLF + CRLF


@lru_cache(maxsize=64)
def _lower_names(names: tuple[str, ...]) -> frozenset[bytes]:
    """Lower-cased header names as bytes (the rate-limit header set repeats: cached)."""
    return frozenset(n.lower().encode() for n in names)


def _connection(keep_alive: bool, http11: bool) -> tuple[bytes, ...]:
    """The Connection header: close when closing; keep-alive when an HTTP/1.0 client stays."""
    if not keep_alive:
        return (b"Connection: close",)
    return () if http11 else (b"Connection: keep-alive",)


def response_headers(headers: Sequence[tuple[bytes, bytes]]) -> RawHeaders:
    """The upstream's response headers to forward (framing is re-done by the gateway)."""
    return end_to_end(headers, _RESPONSE_OWN)


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
