"""Who is calling: device identification headers and the client IP (pure, runs per request).

Device headers (names from `devices.headers`):

- the id header absent: anonymous, `read` returns None (the other headers are then ignored:
  nothing is recorded for an anonymous request);
- any identity header sent more than once: invalid (a client cannot smuggle a second identity,
  and a proxy that merges or picks one of them must not decide which device is charged);
- the id: 1 to 128 visible ASCII characters (0x21-0x7E) but the comma (an upstream could read
  a comma list in the header as several values), and not exactly `.` or `..` (a URL path
  resolves those as dot segments, so no path could name the device: `device_id_problem`);
  an empty id is invalid, not anonymous;
- the other fields: at most 256 characters, no control characters (C0, DEL, C1, U+2028,
  U+2029) and valid UTF-8; absent or empty both mean "not declared" (None), so a client that
  sends `X-App-Name:` does not wipe a stored value with an empty string.

Client IP for anonymous requests: the socket peer, or X-Forwarded-For walked from the right
past `server.trusted_proxies`, as uvicorn's proxy_headers.py does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Final, Protocol

from gateway.config import DeviceSettings
from gateway.errors import IdentityError
from gateway.model import DEVICE_FIELDS, DeviceIdentity

__all__ = [
    "MAX_FIELD_LENGTH",
    "MAX_ID_LENGTH",
    "FieldValues",
    "HeaderLookup",
    "IdentityReader",
    "client_ip",
    "device_id_problem",
    "peer_is_trusted",
]

MAX_ID_LENGTH: Final = 128
MAX_FIELD_LENGTH: Final = 256

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The data plane's rule in one pattern (the per-request fast path): visible ASCII but the
# comma, and not exactly "." or "..". The admin API's rule for ids already stored is the
# older one, any visible ASCII, so records made before the stricter rule stay manageable.
_ID_OK: Final = re.compile(rf"[\x21-\x2b\x2d-\x7e]{{1,{MAX_ID_LENGTH}}}").fullmatch
_DOT_IDS: Final = frozenset({".", ".."})
_ID_STORED: Final = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_LENGTH}}}").fullmatch
# C0, DEL, C1, the Unicode line/paragraph separators (they break log lines just like \n),
# and lone surrogates: aiohttp decodes header bytes with "surrogateescape", so invalid UTF-8
# arrives as U+DC80-U+DCFF, which neither orjson nor redis-py could encode later.
_FIELD_BAD: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]").search
_NONE: Final[tuple[str, ...]] = ()
IDENTITY_CACHE: Final = 8192  # identities IdentityReader keeps (~3 MB; dropped at once: ~1 ms)
# The lone-surrogate range, built at import: mypyc takes no surrogate in a string literal.
_SURROGATES: Final = (chr(0xD800), chr(0xDFFF))

_REPEATED: Final = "sent more than once"
_ID_EMPTY: Final = "must not be empty"
_ID_LONG: Final = f"must be at most {MAX_ID_LENGTH} characters"
_ID_CHARS: Final = "must be visible ASCII characters (0x21-0x7E)"
_ID_COMMA: Final = "must not contain commas"
_ID_DOTS: Final = 'must not be "." or ".."'
_FIELD_LONG: Final = f"must be at most {MAX_FIELD_LENGTH} characters"
_FIELD_CONTROL: Final = "must not contain control characters"
_FIELD_UTF8: Final = "must be valid UTF-8"


class HeaderLookup(Protocol):
    """Every value of a header, by its lower-cased name (a CIMultiDict is one)."""

    def getall(self, key: str, default: Sequence[str], /) -> Sequence[str]: ...


class FieldValues(dict[str, list[str]]):
    """The few headers the Enforcer reads, by lower-cased name: the data plane builds one per
    request from the raw header pairs, which costs less than a case-insensitive multidict."""

    __slots__ = ()

    def getall(self, key: str, default: Sequence[str], /) -> Sequence[str]:
        """The values of header `key` (lower-cased), or `default`."""
        return self.get(key, default)


class IdentityReader:
    """Reads and validates the device identification headers of one request.

    A device sends the same headers request after request: the identity read from one set of
    values is kept (up to IDENTITY_CACHE of them, all dropped at once when full), so that the
    checks run once per distinct set, not once per request. The identity returned may be
    shared between requests: nobody changes one.
    """

    __slots__ = ("_cache", "_cache_size", "_fields", "_id_key", "_id_name")

    def __init__(self, devices: DeviceSettings, *, cache_size: int = IDENTITY_CACHE) -> None:
        names = devices.headers
        # Lookups use lower-cased names: FieldValues holds them so, a multidict folds case.
        self._id_name: str = names.id
        self._id_key: str = names.id.lower()
        self._fields: tuple[tuple[str, str], ...] = tuple(
            (getattr(names, f), getattr(names, f).lower()) for f in DEVICE_FIELDS
        )
        # The values as read (the id, then each field's one value or None) -> the identity.
        self._cache: dict[tuple[str | None, ...], DeviceIdentity] = {}
        self._cache_size = cache_size

    def read(self, headers: HeaderLookup) -> DeviceIdentity | None:
        """The declared identity, None if anonymous; raises IdentityError naming the header."""
        ids = headers.getall(self._id_key, _NONE)
        if not ids:
            return None
        if len(ids) > 1:
            raise IdentityError(self._id_name, _REPEATED)
        device_id = ids[0]
        found = [headers.getall(key, _NONE) for _, key in self._fields]
        read: list[str | None] = [device_id]
        for values in found:
            if len(values) > 1:
                return self._check(device_id, found)  # raises: the field was sent twice
            read.append(values[0] if values else None)
        key = tuple(read)
        identity = self._cache.get(key)
        if identity is None:
            identity = self._check(device_id, found)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = identity
        return identity

    def _check(self, device_id: str, found: list[Sequence[str]]) -> DeviceIdentity:
        """The identity of these values, every rule checked; IdentityError naming the header."""
        # The rule inline (a pattern and a set lookup): a call here costs every request.
        if _ID_OK(device_id) is None or (len(device_id) <= 2 and device_id in _DOT_IDS):
            raise IdentityError(self._id_name, device_id_problem(device_id) or _ID_CHARS)
        values: list[str | None] = []
        for (name, _), field in zip(self._fields, found, strict=True):
            if not field:
                values.append(None)
                continue
            if len(field) > 1:
                raise IdentityError(name, _REPEATED)
            value = field[0]
            if len(value) > MAX_FIELD_LENGTH:
                raise IdentityError(name, _FIELD_LONG)
            bad = _FIELD_BAD(value)
            if bad is not None:
                problem = (
                    _FIELD_UTF8
                    if _SURROGATES[0] <= bad.group() <= _SURROGATES[1]
                    else _FIELD_CONTROL
                )
                raise IdentityError(name, problem)
            values.append(value or None)
        return DeviceIdentity(device_id, *values)


def device_id_problem(device_id: str, *, stored: bool = False) -> str | None:
    """Why `device_id` cannot name a device, or None when it can.

    The data plane's rule by default; `stored=True` is the older, wider rule (any 1 to 128
    visible ASCII characters) by which the admin API still addresses records already kept.
    """
    if stored:
        if _ID_STORED(device_id) is not None:
            return None
    elif _ID_OK(device_id) is not None and device_id not in _DOT_IDS:
        return None
    # The slow path, for the message only.
    if not device_id:
        return _ID_EMPTY
    if len(device_id) > MAX_ID_LENGTH:
        return _ID_LONG
    if _ID_STORED(device_id) is None:
        return _ID_CHARS
    return _ID_COMMA if "," in device_id else _ID_DOTS


@lru_cache(maxsize=4096)
def _parse_ip(text: str) -> tuple[IPAddress, str] | None:
    """One address as a peer or an X-Forwarded-For entry writes it, with its canonical text
    form, or None if it is not one.

    Accepts `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:443` and
    zones (`fe80::1%eth0`, dropped); IPv4-mapped IPv6 becomes IPv4, so one client has one key
    whether it came over IPv4 or a dual-stack socket. Cached by the text as written: peers and
    proxies repeat, and a string keeps its hash (an address object's is computed in Python
    on every lookup).
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        host = host.partition("%")[0]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has at least two
        host, _, port = text.partition(":")
        if not _is_port(port):
            return None
    else:
        host = text.partition("%")[0] if ":" in text else text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, str(ip)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdecimal()


def _trusted(ip: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    # `in` across IP versions is simply False, so one list can mix IPv4 and IPv6 blocks.
    return any(ip in net for net in trusted)


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The client address that keys anonymous rate limits, never one the client picked itself.

    `peer` is the socket peer (None when unknown: "unknown"), `forwarded_for` every
    X-Forwarded-For header value in order. The peer wins unless it lies in a `trusted`
    network; then X-Forwarded-For is walked from the right past trusted hops and the first
    untrusted address is the client. If every entry is trusted the leftmost one is (a trusted
    host calling itself). An entry that is not an IP address (`unknown`, garbage, an
    obfuscated name) stops the walk: the hop to its right wrote it, so that hop is the last
    address we can vouch for and becomes the client. Empty list elements are skipped.
    """
    if peer is None:
        return "unknown"
    parsed = _parse_ip(peer)
    if parsed is None:
        # A unix socket or an odd transport: not spoofable by the client, keep it as given.
        return peer or "unknown"
    if not trusted or not _trusted(parsed[0], trusted):
        return parsed[1]
    last = parsed  # the nearest hop known to be trusted
    for value in reversed(forwarded_for):
        for entry in reversed(value.split(",")):
            text = entry.strip(" \t")
            if not text:
                continue
            hop = _parse_ip(text)
            if hop is None:
                return last[1]
            if not _trusted(hop[0], trusted):
                return hop[1]
            last = hop
    return last[1]


def peer_is_trusted(peer: str | None, trusted: Sequence[IPNetwork]) -> bool:
    """Is the socket peer one of `server.trusted_proxies` (whose forwarding headers count)?"""
    if peer is None or not trusted:
        return False
    parsed = _parse_ip(peer)
    return parsed is not None and _trusted(parsed[0], trusted)
