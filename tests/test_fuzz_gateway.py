"""Property: random requests through the whole gateway never get a 5xx of the gateway's own.

One gateway (DataPlane, the real Enforcer on an embedded memory store, generous limits) runs
in front of the rig's upstream answering every request 200 (marked as its own), for the whole
module, on one event loop kept across hypothesis examples (as test_bucket_model.py does).
Each example sends one random request (method, target, version, header names and values,
identity headers valid or not, a small body framed by Content-Length or chunked) on a new
raw connection and checks:

- an answer marked by the upstream is its 200: the gateway passed the request on;
- any other answer is the gateway's own: never 5xx, always the `{"status": false, ...}`
  envelope, with a status from the documented set;
- afterwards the connection is either closed cleanly (EOF, no reset) when the answer said
  `Connection: close`, or still usable for a next request;
- nothing was logged at error level (no traceback) in the gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.metrics import Metrics
from gateway.store import Store
from tests.rig.client import Answer, RawClient
from tests.rig.upstream import MARK, CountingUpstream, Reply

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds: the bound on every connect, read and close
# What the gateway may answer itself (README: "What a request goes through", "Failure
# behaviour"); 5xx of its own are never acceptable for requests a client sends.
GATEWAY_STATUSES = frozenset({400, 401, 403, 405, 413, 414, 429, 431, 501, 505})
GENEROUS = {"rate": 1_000_000, "burst": 1_000_000}


# ---------------------------------------------------------------- the environment


class ErrorRecords(logging.Handler):
    """Gateway log records at ERROR and above, or carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@dataclass
class Env:
    """The gateway and its upstream, started once for the module."""

    runner: asyncio.Runner
    errors: ErrorRecords
    port: int = 0
    # No decompression on its side: a random Content-Encoding is not the upstream's worry.
    upstream: CountingUpstream = field(default_factory=lambda: CountingUpstream(Reply(body=b"ok")))
    _closers: list[object] = field(default_factory=list)

    @property
    def upstream_requests(self) -> int:
        return self.upstream.arrived

    async def start(self) -> None:
        url = await self.upstream.start()
        config = {
            "upstream": {"url": url, "timeout": 5.0},
            "rate_limits": {"device": GENEROUS, "anonymous": GENEROUS},
            "devices": {"registration_limit": GENEROUS},
            "limits": {"max_body_bytes": 4096},
            "log": {"access": False},
        }
        settings = parse_config(orjson.dumps(config).decode(), "fuzz.yaml")  # JSON is YAML
        store = Store.memory()
        await store.start()
        plane = DataPlane(settings, store, Metrics())
        server = await start_public(plane, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._closers = [server, plane, store]

    async def close(self) -> None:
        server, plane, store = self._closers
        assert isinstance(server, asyncio.Server) and isinstance(plane, DataPlane)
        assert isinstance(store, Store)
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await store.close()
        await self.upstream.close()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """One event loop, gateway and upstream for every example of the module."""
    errors = ErrorRecords()
    logger = logging.getLogger("gateway")
    logger.addHandler(errors)
    try:
        with asyncio.Runner() as runner:
            environment = Env(runner, errors)
            runner.run(environment.start())
            try:
                yield environment
            finally:
                runner.run(environment.close())
    finally:
        logger.removeHandler(errors)


# ---------------------------------------------------------------- random requests

METHODS = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH",
    "PURGE", "LINK", "UNLINK", "QUERY", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "SOURCE",
    "PRI", "BREW", "FOO", "get", "X-CUSTOM", "G3T", "!#$%&'*+-.^_`|~",
]  # fmt: skip
TOKEN = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))
# Names whose values change the framing: the generator frames bodies itself.
FRAMING = frozenset({"content-length", "transfer-encoding"})
IDENTITY = [
    "X-App-Name", "X-App-Version", "X-OS-Name", "X-OS-Version", "X-Device-Manufacturer",
    "X-Device-Model",
]  # fmt: skip

percent = st.integers(0, 255).map(lambda b: f"%{b:02X}")


@st.composite
def paths(draw: st.DrawFn) -> str:
    """'/' and visible ASCII with percent-escapes; now and then a space (an invalid line)."""
    parts = draw(st.lists(st.one_of(st.sampled_from(VISIBLE), percent), max_size=60))
    if parts and draw(st.integers(0, 19)) == 7:
        parts.insert(draw(st.integers(0, len(parts))), " ")
    return "/" + "".join(parts)


odd_targets = st.sampled_from(["*", "http://evil.example/x", "example.com:443", "//host/x"])
targets = st.one_of(*[paths()] * 7, odd_targets)  # mostly origin-form paths
random_names = st.text(TOKEN, min_size=1, max_size=24).filter(lambda n: n.lower() not in FRAMING)
printable_values = st.text(PRINTABLE, max_size=120)
special_headers = st.one_of(
    st.tuples(
        st.just("Connection"),
        st.sampled_from(["close", "keep-alive", "Upgrade", "te, X-Hop", "close, upgrade", "x"]),
    ),
    st.tuples(st.just("Upgrade"), st.sampled_from(["websocket", "h2c", "HTTP/2.0", "x"])),
    st.tuples(st.just("Expect"), st.sampled_from(["100-continue", "200-ok", ""])),
    st.tuples(
        st.sampled_from(["TE", "Trailer", "Keep-Alive", "Proxy-Connection"]), printable_values
    ),
    st.tuples(st.just("Host"), st.sampled_from(["gw", "evil.example", "", "a b"])),
    st.tuples(
        st.just("X-Forwarded-For"),
        st.sampled_from(["203.0.113.7", "unknown", "1.2.3.4, ::1", "[::1]:80", "", "x" * 100]),
    ),
    st.tuples(st.just("Content-Encoding"), st.sampled_from(["gzip", "br", "identity"])),
)
plain_headers = st.tuples(random_names, printable_values)
device_ids = st.one_of(
    st.text(VISIBLE, min_size=1, max_size=128),  # valid
    st.text(VISIBLE, min_size=129, max_size=200),  # too long
    st.sampled_from(["", "a b", "caf\u00e9", "a\u2028b", "\u0085", "{a}", "*", "a:b"]),
)
identity_values = st.one_of(
    st.text(PRINTABLE, max_size=256),  # valid
    st.text(PRINTABLE, min_size=257, max_size=300),  # too long
    st.sampled_from(["\u2028", "\u009b31m", "caf\u00e9", "\u00ff\u00fe"]),
)


def encode_value(value: str) -> bytes:
    # UTF-8 for text; latin-1 escape hatch: "\u00ff\u00fe" becomes the invalid UTF-8 bytes.
    if value == "\u00ff\u00fe":
        return b"\xff\xfe"
    return value.encode()


@dataclass(frozen=True)
class Request:
    """One random request, and how its body is framed."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[int] | None  # chunk sizes when chunked, else None (Content-Length)

    def encode(self) -> bytes:
        lines = [f"{self.method} {self.target} {self.version}".encode()]
        lines.extend(name.encode() + b": " + encode_value(value) for name, value in self.headers)
        body = self.body
        if self.chunks is not None:
            lines.append(b"Transfer-Encoding: chunked")
            framed, at = [], 0
            for size in self.chunks:
                framed.append(b"%x\r\n" % size + body[at : at + size] + b"\r\n")
                at += size
            body = b"".join(framed) + b"0\r\n\r\n"
        elif body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


@st.composite
def requests(draw: st.DrawFn) -> Request:
    headers: list[tuple[str, str]] = []
    if draw(st.booleans()):
        headers.append(("Host", "gw.example"))
    headers.extend(draw(st.lists(st.one_of(plain_headers, special_headers), max_size=8)))
    if draw(st.booleans()):
        headers.append(("X-Device-Id", draw(device_ids)))
        if draw(st.integers(0, 9)) == 7:
            headers.append(("X-Device-Id", draw(device_ids)))  # a second identity
        for name in draw(st.lists(st.sampled_from(IDENTITY), max_size=3)):
            headers.append((name, draw(identity_values)))
    headers = draw(st.permutations(headers))
    # Now and then past limits.max_body_bytes (4096): a 413, declared or cut mid-stream.
    body = draw(st.one_of(st.binary(max_size=600), st.binary(min_size=4000, max_size=4200)))
    chunks = None
    if draw(st.booleans()):
        sizes, left = [], len(body)
        while left:
            size = draw(st.integers(1, left))
            sizes.append(size)
            left -= size
        chunks = sizes
    return Request(
        method=draw(st.sampled_from(METHODS)),
        target=draw(targets),
        version=draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"])),
        headers=headers,
        body=body,
        chunks=chunks,
    )


# ---------------------------------------------------------------- reading answers


def closes(answer: Answer, version: str) -> bool:
    """Whether the answer announces the end of the connection."""
    connection = answer.fields.get("Connection", "").lower()
    if connection == "close":
        return True
    if version == "HTTP/1.0":
        return connection != "keep-alive"
    return "Content-Length" not in answer.fields and "Transfer-Encoding" not in answer.fields


async def check(env: Env, request: Request) -> None:
    before = len(env.errors.records)
    client = await RawClient.connect(env.port, timeout=WAIT)
    try:
        async with asyncio.timeout(WAIT):
            await client.send(request.encode())
            # One final answer (1xx interim answers skipped), its framing undone.
            answer = await client.read_answer(
                head_request=request.method == "HEAD", skip_interim=True
            )
            assert answer.head.startswith(b"HTTP/1.1 "), answer.head
            if answer.fields.get(MARK) == "1":
                event(f"upstream {answer.status}")
            elif request.method == "HEAD":
                event(f"gateway {answer.status} (HEAD)")
            else:
                event(f"gateway {answer.status} {orjson.loads(answer.body)['result'][:40]}")

            if answer.fields.get(MARK) == "1":
                assert answer.status == 200, answer  # the upstream's own answer, passed on
            else:
                assert answer.status < 500, f"the gateway answered {answer.status} itself"
                assert answer.status in GATEWAY_STATUSES, answer
                assert answer.fields["Content-Type"] == "application/json", answer
                if request.method != "HEAD":
                    assert orjson.loads(answer.body) == {
                        "status": False,
                        "result": orjson.loads(answer.body)["result"],
                    }
                    assert isinstance(orjson.loads(answer.body)["result"], str)

            if closes(answer, request.version):
                try:
                    rest = await client.read_to_eof()
                except ConnectionResetError:
                    pytest.fail("the connection was reset instead of closed")
                assert rest == b"", rest
            else:
                await client.send(b"GET /next HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                following = await client.read_answer(skip_interim=True)
                assert (following.status, following.fields.get(MARK)) == (200, "1"), following
    finally:
        await abort(client)
    assert [r.getMessage() for r in env.errors.records[before:]] == []


async def abort(client: RawClient) -> None:
    """Drop a client connection at once (nothing left to flush), bounded."""
    client.abort()
    try:
        async with asyncio.timeout(WAIT):
            await client.writer.wait_closed()
    except ConnectionError:
        pass


@settings(max_examples=200, deadline=None)
@given(request=requests())
def test_random_requests_get_no_gateway_5xx_and_only_envelope_answers(
    env: Env, request: Request
) -> None:
    env.runner.run(check(env, request))


# ---------------------------------------------------------------- its findings, pinned


def raw_exchange(env: Env, request: bytes) -> tuple[bytes, bytes]:
    """Send `request`, read until the gateway closes (bounded): (head, everything after)."""

    async def run() -> bytes:
        client = await RawClient.connect(env.port, timeout=WAIT)
        try:
            client.write(request)
            try:
                async with asyncio.timeout(3.0):
                    return await client.read_to_eof()
            except TimeoutError:
                return b"<no close within 3 s>"
        finally:
            await abort(client)

    data = env.runner.run(run())
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def test_a_head_request_refused_by_the_connection_gets_no_body(env: Env) -> None:
    # Found by the property above (fixed in 0b97a4b): an answer to HEAD has no content, also
    # when the connection refuses the request before any exchange (here: absolute form).
    head, rest = raw_exchange(env, b"HEAD http://evil.example/ HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Type: application/json" in head
    assert rest == b""


def test_an_upgrade_offer_with_a_body_is_refused_at_once(env: Env) -> None:
    # Found by the property above (fixed in 0b97a4b): llhttp stops at an upgrade offer right
    # after the head, so its body could never be read; it was forwarded as a head promising
    # a body that never came (504 after upstream.timeout). This is what
    # `curl --http2 -d hello http://...` sends.
    before = env.upstream_requests
    head, rest = raw_exchange(
        env,
        b"POST /up HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    )
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert orjson.loads(rest) == {
        "status": False,
        "result": "A request offering an upgrade cannot carry a body",
    }
    assert env.upstream_requests == before


def test_a_plain_request_is_forwarded_by_the_fuzzed_gateway(env: Env) -> None:
    # The property above is not vacuous: this gateway does pass ordinary requests on.
    head, body = raw_exchange(env, b"GET /plain HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and f"{MARK}: 1".encode() in head, head
    assert body == b"ok"
