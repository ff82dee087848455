"""gateway.identity: device headers -> DeviceIdentity, and the client IP for anonymous keys."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import DeviceHeaders, DeviceSettings
from gateway.errors import IdentityError
from gateway.identity import IdentityReader, client_ip, device_id_problem, peer_is_trusted
from gateway.model import DEVICE_FIELDS, DeviceIdentity

DEFAULT = IdentityReader(DeviceSettings())
NAMES = DeviceHeaders()


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


ID = "X-Device-Id"
APP = "X-App-Name"

# ---------------------------------------------------------------- read(): accepted


class Ok(NamedTuple):
    pairs: tuple[tuple[str, str], ...]
    expected: DeviceIdentity | None


OK_CASES: dict[str, Ok] = {
    "no-headers-is-anonymous": Ok((), None),
    "other-fields-without-id-are-anonymous": Ok(((APP, "shop"), ("X-OS-Name", "iOS")), None),
    "repeated-field-without-id-is-anonymous": Ok(((APP, "a"), (APP, "b")), None),
    "id-only": Ok(((ID, "abc-123"),), DeviceIdentity("abc-123")),
    "all-fields": Ok(
        (
            (ID, "d1"),
            ("X-App-Name", "shop"),
            ("X-App-Version", "2.4.1"),
            ("X-OS-Name", "Android"),
            ("X-OS-Version", "14"),
            ("X-Device-Manufacturer", "Google"),
            ("X-Device-Model", "Pixel 8"),
        ),
        DeviceIdentity("d1", "shop", "2.4.1", "Android", "14", "Google", "Pixel 8"),
    ),
    "header-names-are-case-insensitive": Ok(
        (("x-DEVICE-id", "d1"), ("x-app-name", "shop")), DeviceIdentity("d1", application="shop")
    ),
    "unrelated-headers-ignored": Ok(
        (("Host", "a"), (ID, "d1"), ("Cookie", "x\x01")), DeviceIdentity("d1")
    ),
    "id-lowest-visible-char": Ok(((ID, "!"),), DeviceIdentity("!")),
    "id-highest-visible-char": Ok(((ID, "~"),), DeviceIdentity("~")),
    "id-punctuation-braces-colons": Ok(((ID, "{a}:b*c"),), DeviceIdentity("{a}:b*c")),
    "id-128-chars": Ok(((ID, "x" * 128),), DeviceIdentity("x" * 128)),
    "id-three-dots": Ok(((ID, "..."),), DeviceIdentity("...")),
    "id-dot-first": Ok(((ID, ".a"),), DeviceIdentity(".a")),
    "id-dots-last": Ok(((ID, "a.."),), DeviceIdentity("a..")),
    "id-percent-encoded-dots-are-text": Ok(((ID, "%2e%2e"),), DeviceIdentity("%2e%2e")),
    "empty-field-is-not-declared": Ok(((ID, "d1"), (APP, "")), DeviceIdentity("d1")),
    "field-256-chars": Ok(((ID, "d1"), (APP, "a" * 256)), DeviceIdentity("d1", "a" * 256)),
    "field-256-non-ascii-chars": Ok(
        ((ID, "d1"), (APP, "é" * 256)), DeviceIdentity("d1", "é" * 256)
    ),
    "field-unicode-text": Ok(
        ((ID, "d1"), ("X-Device-Model", "Galaxy Ŝ21 📱 小米")),
        DeviceIdentity("d1", model="Galaxy Ŝ21 📱 小米"),
    ),
    "field-no-break-space-is-not-control": Ok(
        ((ID, "d1"), (APP, "a\xa0b")), DeviceIdentity("d1", "a\xa0b")
    ),
    "field-space-only-is-kept": Ok(((ID, "d1"), (APP, " ")), DeviceIdentity("d1", " ")),
}


@pytest.mark.parametrize("case", OK_CASES.values(), ids=OK_CASES.keys())
def test_read_accepts(case: Ok) -> None:
    assert DEFAULT.read(headers(*case.pairs)) == case.expected


# ---------------------------------------------------------------- read(): rejected


class Bad(NamedTuple):
    pairs: tuple[tuple[str, str], ...]
    header: str
    reason: str


TOO_MANY = "sent more than once"
ID_CHARS = "must be visible ASCII characters (0x21-0x7E)"
CONTROL = "must not contain control characters"
DOTS = 'must not be "." or ".."'

BAD_CASES: dict[str, Bad] = {
    "id-repeated": Bad(((ID, "a"), (ID, "b")), ID, TOO_MANY),
    "id-repeated-same-value": Bad(((ID, "a"), (ID, "a")), ID, TOO_MANY),
    "id-repeated-other-case": Bad(((ID, "a"), ("x-device-id", "b")), ID, TOO_MANY),
    "id-repeated-one-empty": Bad(((ID, "a"), (ID, "")), ID, TOO_MANY),
    "id-empty": Bad(((ID, ""),), ID, "must not be empty"),
    "id-129-chars": Bad(((ID, "x" * 129),), ID, "must be at most 128 characters"),
    "id-space": Bad(((ID, "a b"),), ID, ID_CHARS),
    "id-tab": Bad(((ID, "a\tb"),), ID, ID_CHARS),
    "id-newline-at-end": Bad(((ID, "ab\n"),), ID, ID_CHARS),
    "id-nul": Bad(((ID, "a\x00"),), ID, ID_CHARS),
    "id-del": Bad(((ID, "a\x7f"),), ID, ID_CHARS),
    "id-non-ascii": Bad(((ID, "gerät"),), ID, ID_CHARS),
    "id-invalid-utf8": Bad(((ID, "a\udcff"),), ID, ID_CHARS),
    "id-comma": Bad(((ID, "a,b"),), ID, "must not contain commas"),
    "id-comma-only": Bad(((ID, ","),), ID, "must not contain commas"),
    "id-dot": Bad(((ID, "."),), ID, DOTS),
    "id-dot-dot": Bad(((ID, ".."),), ID, DOTS),
    "field-repeated": Bad(((ID, "d1"), (APP, "a"), (APP, "b")), APP, TOO_MANY),
    "last-field-repeated": Bad(
        ((ID, "d1"), ("X-Device-Model", "a"), ("X-Device-Model", "a")),
        "X-Device-Model",
        TOO_MANY,
    ),
    "field-257-chars": Bad(((ID, "d1"), (APP, "a" * 257)), APP, "must be at most 256 characters"),
    "field-nul": Bad(((ID, "d1"), (APP, "a\x00b")), APP, CONTROL),
    "field-tab": Bad(((ID, "d1"), (APP, "a\tb")), APP, CONTROL),
    "field-newline": Bad(((ID, "d1"), (APP, "a\nb")), APP, CONTROL),
    "field-unit-separator-0x1f": Bad(((ID, "d1"), (APP, "a\x1f")), APP, CONTROL),
    "field-del": Bad(((ID, "d1"), (APP, "a\x7f")), APP, CONTROL),
    "field-c1-first-0x80": Bad(((ID, "d1"), (APP, "a\x80")), APP, CONTROL),
    "field-c1-next-line-0x85": Bad(((ID, "d1"), (APP, "a\x85")), APP, CONTROL),
    "field-c1-last-0x9f": Bad(((ID, "d1"), (APP, "a\x9f")), APP, CONTROL),
    "field-line-separator": Bad(((ID, "d1"), (APP, "a\u2028")), APP, CONTROL),
    "field-paragraph-separator": Bad(((ID, "d1"), (APP, "a\u2029")), APP, CONTROL),
    # aiohttp decodes header bytes with surrogateescape: b"\xff" arrives as "\udcff".
    "field-invalid-utf8": Bad(((ID, "d1"), (APP, "a\udcff")), APP, "must be valid UTF-8"),
    "id-checked-before-fields": Bad(((ID, ""), (APP, "a\x00")), ID, "must not be empty"),
}


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_read_rejects(case: Bad) -> None:
    with pytest.raises(IdentityError) as caught:
        DEFAULT.read(headers(*case.pairs))
    assert caught.value.header == case.header
    assert str(caught.value) == f"Invalid {case.header} header: {case.reason}"


def test_every_field_header_is_validated() -> None:
    # Each of the six fields, not only the one the table happens to use.
    for field in DEVICE_FIELDS:
        name = getattr(NAMES, field)
        with pytest.raises(IdentityError) as caught:
            DEFAULT.read(headers((ID, "d1"), (name, "bad\n")))
        assert caught.value.header == name
        with pytest.raises(IdentityError):
            DEFAULT.read(headers((ID, "d1"), (name, "a"), (name, "b")))
        assert getattr(DEFAULT.read(headers((ID, "d1"), (name, "v"))), field) == "v"


def test_the_same_headers_give_the_same_identity_checked_once() -> None:
    """A device's next request with the same values reuses the identity (the checks ran
    once); other values, or one value more or less, are read and checked afresh."""
    reader = IdentityReader(DeviceSettings())
    first = reader.read(headers((ID, "dev-1"), (APP, "FieldApp")))
    again = reader.read(headers((ID, "dev-1"), (APP, "FieldApp")))
    assert first is again and first == DeviceIdentity("dev-1", "FieldApp")
    other = reader.read(headers((ID, "dev-1"), (APP, "Courier")))
    fewer = reader.read(headers((ID, "dev-1")))
    assert other == DeviceIdentity("dev-1", "Courier") and other is not first
    assert fewer == DeviceIdentity("dev-1") and fewer is not first


def test_an_invalid_value_is_refused_every_time() -> None:
    """Only identities that passed every check are kept: a refused one is refused again,
    also after a valid request of the same device."""
    reader = IdentityReader(DeviceSettings())
    assert reader.read(headers((ID, "dev-1"), (APP, "ok"))) is not None
    for _ in range(2):
        with pytest.raises(IdentityError, match=APP):
            reader.read(headers((ID, "dev-1"), (APP, "bad\x01")))
        with pytest.raises(IdentityError, match=APP):
            reader.read(headers((ID, "dev-1"), (APP, "ok"), (APP, "ok")))  # sent twice
        with pytest.raises(IdentityError, match=ID):
            reader.read(headers((ID, "dev 1"), (APP, "ok")))


def test_the_kept_identities_are_bounded() -> None:
    reader = IdentityReader(DeviceSettings(), cache_size=10)
    for i in range(35):
        assert reader.read(headers((ID, f"dev-{i}"))) == DeviceIdentity(f"dev-{i}")
        assert len(reader._cache) <= 10


def test_configured_header_names_are_used() -> None:
    custom = DeviceHeaders(
        id="X-Client-Id",
        application="X-App",
        application_version="X-App-Ver",
        os="X-Os",
        os_version="X-Os-Ver",
        manufacturer="X-Vendor",
        model="X-Model",
    )
    reader = IdentityReader(DeviceSettings(headers=custom))
    # The default names mean nothing to it...
    assert reader.read(headers((ID, "d1"), (APP, "shop"))) is None
    # ...its own do, and errors name them.
    got = reader.read(headers(("x-client-id", "d1"), ("X-Vendor", "ACME"), (APP, "ignored")))
    assert got == DeviceIdentity("d1", manufacturer="ACME")
    with pytest.raises(IdentityError, match=r"^Invalid X-Client-Id header: "):
        reader.read(headers(("X-Client-Id", "a"), ("X-Client-Id", "b")))


def test_header_values_are_not_altered() -> None:
    got = DEFAULT.read(headers((ID, "d1"), (APP, "  padded  ")))
    assert got == DeviceIdentity("d1", "  padded  ")


# ---------------------------------------------------------------- read(): property

HEADER_NAMES = [getattr(NAMES, f.name) for f in fields(DeviceHeaders)]

# Everything a header value can hold after aiohttp decoded it, surrogates included, with
# extra weight on the boundaries the rule draws.
_any_char = st.characters(codec=None, exclude_categories=())
_edge_char = st.sampled_from(
    [
        *("\x00", "\t", "\x1f", " ", "!", "~", "\x7f", "\x80", "\x85", "\x9f", "\xa0"),
        *("\u2028", "\u2029", "\ud800", "\udcff", "\udfff", "é", "\U0001f4f1"),
        *(",", "."),
    ]
)
# Values that pass for any header: most values are, so later headers get checked too.
_plain = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)
_with_edge = st.tuples(_plain, _edge_char, _plain).map("".join)
_values = st.one_of(
    _plain,
    st.just(""),
    # a plain value with one boundary character in it (weighted: most rules live here)
    _with_edge,
    _with_edge,
    _with_edge,
    # lengths around both limits
    st.builds(
        lambda n, c: c * n,
        st.sampled_from([127, 128, 129, 255, 256, 257]),
        st.sampled_from(["a", "é"]),
    ),
    st.text(st.one_of(_any_char, _edge_char), max_size=30),
)


@st.composite
def _header_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A valid set of identity headers (any spelling, any order), then 0-3 perturbations.

    Few perturbations per example keep later headers reachable: with every value random,
    the first bad header would hide every rule behind it.
    """
    spell = st.sampled_from
    pairs = [
        (draw(spell([name, name.lower(), name.upper()])), draw(_plain))
        for name in HEADER_NAMES
        if draw(st.integers(0, 4))  # each header absent one time in five
    ]
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["replace", "repeat", "noise"]))
        if kind == "replace" and pairs:
            i = draw(st.integers(0, len(pairs) - 1))
            pairs[i] = (pairs[i][0], draw(_values))
        elif kind == "repeat":
            name = draw(st.sampled_from(HEADER_NAMES))
            pairs.append((draw(spell([name, name.lower(), name.upper()])), draw(_values)))
        else:
            pairs.append(("X-Other", draw(_values)))
    return list(draw(st.permutations(pairs)))


def _id_ok(value: str) -> bool:
    """The data plane's id rule, written out without the module's regexes."""
    visible = 1 <= len(value) <= 128 and all(33 <= ord(c) <= 126 for c in value)
    return visible and "," not in value and value not in (".", "..")


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029)


def _is_surrogate(ch: str) -> bool:
    return 0xD800 <= ord(ch) <= 0xDFFF


def _expected(pairs: list[tuple[str, str]]) -> DeviceIdentity | str | None:
    """The documented rule, written out without the module's regexes: identity or bad header."""
    by_name: dict[str, list[str]] = {}
    for key, value in pairs:
        by_name.setdefault(key.lower(), []).append(value)
    ids = by_name.get(NAMES.id.lower(), [])
    if not ids:
        return None
    if len(ids) != 1:
        return NAMES.id
    device_id = ids[0]
    if not _id_ok(device_id):
        return NAMES.id
    values: dict[str, str | None] = {}
    for field in DEVICE_FIELDS:
        name: str = getattr(NAMES, field)
        found = by_name.get(name.lower(), [])
        if len(found) > 1:
            return name
        value = found[0] if found else ""
        if len(value) > 256 or any(_is_control(c) or _is_surrogate(c) for c in value):
            return name
        values[field] = value if value else None
    return DeviceIdentity(device_id, **values)


@settings(max_examples=500)
@given(_header_lists())
def test_read_is_total_and_follows_the_rule(pairs: list[tuple[str, str]]) -> None:
    expected = _expected(pairs)
    event(
        "accepted"
        if isinstance(expected, DeviceIdentity)
        else "anonymous"
        if expected is None
        else "rejected"
    )
    try:
        got: DeviceIdentity | str | None = DEFAULT.read(headers(*pairs))
    except IdentityError as exc:  # anything else escapes and fails the test
        got = exc.header
    assert got == expected


# One header at a time: every example exercises a rule instead of hiding behind another.
_single = st.one_of(
    _with_edge,
    st.text(st.one_of(_any_char, _edge_char), max_size=40),
    st.builds(
        lambda n, c: c * n,
        st.sampled_from([0, 1, 2, 3, 127, 128, 129, 255, 256, 257]),
        st.sampled_from(["a", "~", "é", "\x85", ".", ","]),
    ),
)


@settings(max_examples=300)
@given(_single)
def test_any_single_id_value_is_accepted_exactly_by_the_rule(value: str) -> None:
    ok = _id_ok(value)
    try:
        got = DEFAULT.read(headers((ID, value)))
    except IdentityError as exc:
        assert not ok and exc.header == ID
    else:
        assert ok and got == DeviceIdentity(value)


@settings(max_examples=300)
@given(st.sampled_from(DEVICE_FIELDS), _single)
def test_any_single_field_value_is_accepted_exactly_by_the_rule(field: str, value: str) -> None:
    name = getattr(NAMES, field)
    ok = len(value) <= 256 and not any(_is_control(c) or _is_surrogate(c) for c in value)
    try:
        got = DEFAULT.read(headers((ID, "d1"), (name, value)))
    except IdentityError as exc:
        assert not ok and exc.header == name
    else:
        assert ok and got == DeviceIdentity("d1", **{field: value or None})


# ---------------------------------------------------------------- device_id_problem()


class IdRule(NamedTuple):
    device_id: str
    new: str | None  # the data plane's rule (the default)
    stored: str | None  # stored=True: the rule by which the admin API addresses records


ID_RULE_CASES: dict[str, IdRule] = {
    "plain": IdRule("phone-1", None, None),
    "awkward-but-fine": IdRule("%2e%2e/{d001}?#", None, None),
    "three-dots": IdRule("...", None, None),
    "dot": IdRule(".", DOTS, None),
    "dot-dot": IdRule("..", DOTS, None),
    "comma": IdRule("a,b", "must not contain commas", None),
    "comma-and-dots": IdRule(".,.", "must not contain commas", None),
    "empty": IdRule("", "must not be empty", "must not be empty"),
    "too-long": IdRule(
        "x" * 129, "must be at most 128 characters", "must be at most 128 characters"
    ),
    "space": IdRule("a b", ID_CHARS, ID_CHARS),
    "non-ascii-with-comma": IdRule("é,", ID_CHARS, ID_CHARS),
}


@pytest.mark.parametrize("case", ID_RULE_CASES.values(), ids=ID_RULE_CASES.keys())
def test_device_id_problem(case: IdRule) -> None:
    assert device_id_problem(case.device_id) == case.new
    assert device_id_problem(case.device_id, stored=True) == case.stored


# ---------------------------------------------------------------- client_ip()


def nets(*cidrs: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


PRIVATE = nets("10.0.0.0/8", "fd00::/8")


class Ip(NamedTuple):
    peer: str | None
    xff: list[str]
    trusted: tuple[Any, ...]
    expected: str


IP_CASES: dict[str, Ip] = {
    "no-peer": Ip(None, ["1.2.3.4"], PRIVATE, "unknown"),
    "empty-peer": Ip("", [], PRIVATE, "unknown"),
    "non-ip-peer-kept": Ip("/run/gateway.sock", ["1.2.3.4"], PRIVATE, "/run/gateway.sock"),
    "peer-without-xff": Ip("1.2.3.4", [], PRIVATE, "1.2.3.4"),
    "untrusted-peer-ignores-xff": Ip("6.6.6.6", ["1.2.3.4"], PRIVATE, "6.6.6.6"),
    "no-trusted-proxies-ignores-xff": Ip("10.0.0.1", ["1.2.3.4"], (), "10.0.0.1"),
    "trusted-peer-without-xff": Ip("10.0.0.1", [], PRIVATE, "10.0.0.1"),
    "trusted-peer-empty-xff": Ip("10.0.0.1", [" , ,"], PRIVATE, "10.0.0.1"),
    "one-hop": Ip("10.0.0.1", ["1.2.3.4"], PRIVATE, "1.2.3.4"),
    "spoofed-prefix-is-skipped": Ip("10.0.0.1", ["6.6.6.6, 1.2.3.4"], PRIVATE, "1.2.3.4"),
    "spoofed-trusted-prefix-is-skipped": Ip("10.0.0.1", ["10.9.9.9, 1.2.3.4"], PRIVATE, "1.2.3.4"),
    "two-trusted-hops": Ip("10.0.0.1", ["6.6.6.6, 1.2.3.4, 10.0.0.2"], PRIVATE, "1.2.3.4"),
    "all-trusted-gives-leftmost": Ip("10.0.0.1", ["10.0.0.3, 10.0.0.2"], PRIVATE, "10.0.0.3"),
    "several-headers-in-order": Ip("10.0.0.1", ["6.6.6.6", "1.2.3.4"], PRIVATE, "1.2.3.4"),
    "several-headers-with-trusted-hop": Ip(
        "10.0.0.1", ["6.6.6.6, 1.2.3.4", "10.0.0.2"], PRIVATE, "1.2.3.4"
    ),
    "empty-elements-skipped": Ip("10.0.0.1", ["6.6.6.6,, 1.2.3.4 ,, "], PRIVATE, "1.2.3.4"),
    "whitespace-and-tabs": Ip("10.0.0.1", ["\t1.2.3.4\t"], PRIVATE, "1.2.3.4"),
    "invalid-rightmost-gives-peer": Ip("10.0.0.1", ["1.2.3.4, garbage"], PRIVATE, "10.0.0.1"),
    "unknown-rightmost-gives-peer": Ip("10.0.0.1", ["unknown"], PRIVATE, "10.0.0.1"),
    "invalid-behind-trusted-hop-gives-that-hop": Ip(
        "10.0.0.1", ["1.2.3.4, _hidden, 10.0.0.2"], PRIVATE, "10.0.0.2"
    ),
    "invalid-left-of-client-never-read": Ip("10.0.0.1", ["garbage, 1.2.3.4"], PRIVATE, "1.2.3.4"),
    "ipv4-with-port": Ip("10.0.0.1", ["1.2.3.4:5678"], PRIVATE, "1.2.3.4"),
    "ipv4-with-bad-port-is-invalid": Ip("10.0.0.1", ["1.2.3.4:http"], PRIVATE, "10.0.0.1"),
    "ipv6-bare": Ip("10.0.0.1", ["2001:db8::1"], PRIVATE, "2001:db8::1"),
    "ipv6-brackets": Ip("10.0.0.1", ["[2001:db8::1]"], PRIVATE, "2001:db8::1"),
    "ipv6-brackets-port": Ip("10.0.0.1", ["[2001:db8::1]:443"], PRIVATE, "2001:db8::1"),
    "ipv6-unclosed-bracket-is-invalid": Ip("10.0.0.1", ["[2001:db8::1"], PRIVATE, "10.0.0.1"),
    "ipv6-brackets-bad-port-is-invalid": Ip("10.0.0.1", ["[2001:db8::1]:x"], PRIVATE, "10.0.0.1"),
    "ipv6-zone-dropped": Ip("10.0.0.1", ["fe80::1%eth0"], PRIVATE, "fe80::1"),
    "ipv6-zone-in-brackets-dropped": Ip("10.0.0.1", ["[fe80::1%eth0]:80"], PRIVATE, "fe80::1"),
    "ipv4-zone-is-invalid": Ip("10.0.0.1", ["1.2.3.4%eth0"], PRIVATE, "10.0.0.1"),
    "ipv6-canonical-form": Ip("10.0.0.1", ["2001:DB8:0:0::01"], PRIVATE, "2001:db8::1"),
    "ipv6-peer-canonical-form": Ip("2001:DB8::0001", [], PRIVATE, "2001:db8::1"),
    "ipv4-mapped-peer": Ip("::ffff:1.2.3.4", [], PRIVATE, "1.2.3.4"),
    "ipv4-mapped-peer-trusted-by-ipv4-cidr": Ip("::ffff:10.0.0.1", ["1.2.3.4"], PRIVATE, "1.2.3.4"),
    "ipv4-mapped-xff-entry": Ip("10.0.0.1", ["::ffff:1.2.3.4"], PRIVATE, "1.2.3.4"),
    "ipv4-mapped-xff-hop-trusted": Ip("10.0.0.1", ["1.2.3.4, ::ffff:10.0.0.2"], PRIVATE, "1.2.3.4"),
    "ipv6-trusted-peer": Ip("fd00::5", ["1.2.3.4"], PRIVATE, "1.2.3.4"),
    "ipv6-untrusted-peer": Ip("2001:db8::5", ["1.2.3.4"], PRIVATE, "2001:db8::5"),
    "single-address-trusted": Ip("192.0.2.7", ["1.2.3.4"], nets("192.0.2.7"), "1.2.3.4"),
    "neighbour-of-trusted-address-is-not": Ip(
        "192.0.2.8", ["1.2.3.4"], nets("192.0.2.7"), "192.0.2.8"
    ),
}


@pytest.mark.parametrize("case", IP_CASES.values(), ids=IP_CASES.keys())
def test_client_ip(case: Ip) -> None:
    assert client_ip(case.peer, case.xff, case.trusted) == case.expected


_untrusted_v4 = st.ip_addresses(v=4).filter(lambda ip: not any(ip in n for n in PRIVATE))
_trusted_v4 = st.ip_addresses(v=4, network="10.0.0.0/8")
# Pieces that make near-addresses, separators and trusted-looking entries.
_xff_text = st.lists(
    st.sampled_from([*"0123456789abcdef.:[], %\t", "10.1.2.3", "::ffff:", "unknown"])
).map("".join)


@given(
    client=_untrusted_v4,
    sent=st.lists(_xff_text, max_size=3),
    hops=st.lists(_trusted_v4, min_size=1, max_size=4),
    how=st.sampled_from(["append-to-last-header", "one-new-header", "header-per-hop"]),
)
def test_an_untrusted_client_cannot_choose_its_key(
    client: Any, sent: list[str], hops: list[Any], how: str
) -> None:
    # The client sends any X-Forwarded-For it likes; each trusted proxy then appends the
    # address it saw (first the client's, then the previous proxy's). The last proxy is the
    # socket peer.
    seen = [str(client), *map(str, hops[:-1])]
    if how == "append-to-last-header" and sent:
        xff = [*sent[:-1], ", ".join([sent[-1], *seen])]
    elif how == "header-per-hop":
        xff = [*sent, *seen]
    else:
        xff = [*sent, ", ".join(seen)]
    assert client_ip(str(hops[-1]), xff, PRIVATE) == str(client)


@given(peer=_untrusted_v4, xff=st.lists(_xff_text, max_size=3))
def test_an_untrusted_peer_is_the_client_whatever_it_forwards(peer: Any, xff: list[str]) -> None:
    assert client_ip(str(peer), xff, PRIVATE) == str(peer)


@given(peer=_trusted_v4, xff=st.lists(st.text(), max_size=4))
def test_client_ip_is_total(peer: Any, xff: list[str]) -> None:
    result = client_ip(str(peer), xff, PRIVATE)
    # Always an address, never text lifted unparsed from the header.
    assert ipaddress.ip_address(result)


# ---------------------------------------------------------------- purity


def test_identity_module_is_pure() -> None:
    # In a fresh interpreter: this test process has long imported everything.
    probe = (
        "import sys, gateway.identity; "
        "bad = sorted(m for m in sys.modules if m == 'redis' or m.startswith(('redis.', "
        "'aiohttp.web'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


TRUSTED_NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
PEER_TRUST: dict[str, tuple[str | None, bool]] = {
    "inside a trusted block": ("10.1.2.3", True),
    "outside": ("198.51.100.9", False),
    "IPv6 inside": ("fd00::7", True),
    "IPv4-mapped IPv6 of a trusted address": ("::ffff:10.1.2.3", True),
    "unknown peer": (None, False),
    "not an address (a unix socket)": ("/run/gw.sock", False),
}


@pytest.mark.parametrize(("peer", "expected"), PEER_TRUST.values(), ids=PEER_TRUST.keys())
def test_peer_is_trusted(peer: str | None, expected: bool) -> None:
    assert peer_is_trusted(peer, TRUSTED_NETS) is expected
    assert peer_is_trusted(peer, ()) is False  # nothing configured: nobody is trusted
