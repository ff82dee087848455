"""A bare reverse proxy: the floor under the gateway's cost (docs/bench.md).

    python bench/bare_proxy.py --port 8080 --upstream 127.0.0.1:9000 [--redis URL]

What the gateway's data plane is built from and nothing more: raw asyncio protocols (on
uvloop when installed, as the gateway), requests and answers parsed by httptools (llhttp),
a keep-alive upstream connection pool. No identity, no enforcement, no rate-limit headers,
no deadlines, no access log, no metrics. Hop-by-hop headers are dropped both ways, a
request body is buffered and sent with its length, an answer without a length is re-framed
chunked; pipelined requests are answered in order.

With `--redis redis://HOST:PORT/DB`, every request first makes one EVALSHA of a script that
returns 1 (keyed by its X-Device-Id), pipelined as the gateway's store client does it: the
calls of one loop tick packed by hiredis and sent in one write, replies parsed by hiredis'
reader and matched first in, first out. Unlike the gateway it waits with a callback, not a
task and a future, and it never reconnects: a benchmark's baseline, not a product.

bench/breakdown.py measures it beside the gateway, phase by phase; bench/peers.py adds it to
the throughput table. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast
from urllib.parse import urlsplit

import hiredis
import httptools

HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
     b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)  # fmt: skip
DROPPED: Final = HOP_BY_HOP | {b"content-length", b"expect"}  # re-framed by the proxy
BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
MAX_QUEUED: Final = 8  # pipelined requests waiting before the client is not read
SCRIPT: Final = b"return 1"
DEVICE_ID: Final = b"x-device-id"
CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
BAD_REQUEST: Final = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BAD_GATEWAY: Final = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
STORE_DOWN: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)

_pack = cast(Callable[[tuple[str | int | bytes, ...]], bytes], hiredis.pack_command)


class Request:
    """One parsed request: what goes upstream, and how its answer is framed."""

    __slots__ = ("head", "head_only", "http11", "keep_alive", "key")

    def __init__(self, head: bytes, key: bytes, *, head_only: bool, keep_alive: bool,
                 http11: bool) -> None:  # fmt: skip
        self.head = head  # request line, headers and body, as sent upstream
        self.key = key  # the Redis key of its one script call
        self.head_only = head_only
        self.keep_alive = keep_alive
        self.http11 = http11


class Store:
    """One pipelined connection to Redis running SCRIPT by EVALSHA; callbacks, no futures."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.sha = hashlib.sha1(SCRIPT).hexdigest().encode()
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._outbox: list[bytes] = []
        self._waiting: deque[Callable[[bool], None]] = deque()
        self._queued: list[Callable[[bool], None]] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect, select the db and load the script; raises OSError when Redis refuses."""
        self._loop = loop
        ready: asyncio.Future[bool] = loop.create_future()
        await loop.create_connection(lambda: _StoreProtocol(self), self.host, self.port)
        setup = [_pack(("SELECT", self.db)), _pack(("SCRIPT", "LOAD", SCRIPT))]
        assert self.transport is not None
        self.transport.write(b"".join(setup))
        self._waiting.append(lambda ok: None)
        self._waiting.append(lambda ok: ready.set_result(ok))
        if not await asyncio.wait_for(ready, 10):
            raise OSError(f"Redis at {self.host}:{self.port} refused SELECT or SCRIPT LOAD")

    def call(self, key: bytes, done: Callable[[bool], None]) -> None:
        """EVALSHA with one key; `done(True)` once Redis answered, `done(False)` if not."""
        if self.transport is None:
            done(False)
            return
        self._outbox.append(_pack((b"EVALSHA", self.sha, 1, key)))
        self._queued.append(done)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport, outbox, queued = self.transport, self._outbox, self._queued
        self._outbox, self._queued = [], []
        if transport is None:
            for done in queued:
                done(False)
            return
        self._waiting.extend(queued)
        transport.write(b"".join(outbox))

    def replies(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            self._waiting.popleft()(not isinstance(reply, hiredis.ReplyError))

    def lost(self) -> None:
        self.transport = None
        waiting, self._waiting = self._waiting, deque()
        for done in waiting:
            done(False)


class _StoreProtocol(asyncio.Protocol):
    def __init__(self, store: Store) -> None:
        self.store = store

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.store.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.store.replies(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.store.lost()


class Pool:
    """Keep-alive connections to the upstream; a new one whenever none is idle."""

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.port = port
        self.loop = loop
        self.idle: list[Upstream] = []

    def send(self, request: Request, client: Client) -> None:
        """Send `request` on an idle connection, or on a new one once it is open."""
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.send(request, client)
                return
        self.loop.create_task(self._open_and_send(request, client))

    async def _open_and_send(self, request: Request, client: Client) -> None:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Upstream(self), self.host, self.port), 10
            )
        except (OSError, TimeoutError):
            client.failed(BAD_GATEWAY)
            return
        if client.transport is None:
            self.release(conn)
            return
        conn.send(request, client)

    def release(self, conn: Upstream) -> None:
        if conn.transport is not None and not conn.transport.is_closing():
            self.idle.append(conn)


class Upstream(asyncio.Protocol):
    """One upstream connection: answers parsed by llhttp and relayed to their client."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.request: Request | None = None
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.out: list[bytes] = []
        self.chunked = False
        self.until_close = False
        self.started = False  # bytes of the answer went to the client
        self.done = False
        self.reusable = False

    def send(self, request: Request, client: Client) -> None:
        self.client, self.request = client, request
        self.reason, self.headers, self.out = b"", [], []
        self.chunked = self.until_close = self.started = self.done = False
        client.upstream = self
        assert self.transport is not None
        self.transport.write(request.head)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            if self.transport is not None:
                self.transport.abort()  # bytes nobody asked for
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.client = None
            if self.transport is not None:
                self.transport.abort()
            client.failed(None if self.started else BAD_GATEWAY)
            return
        if self.out:
            self.started = True
            client.relay(self.out)
            self.out = []
        if self.done:
            self.client = None
            if self.reusable:
                self.pool.release(self)
            elif self.transport is not None:
                self.transport.close()
            client.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        client, self.client = self.client, None
        if client is None:
            return
        if self.until_close and exc is None:
            client.relay([*self.out, LAST_CHUNK if self.chunked else b""])
            client.answered(close=not self.chunked)
        else:
            client.failed(None if self.started else BAD_GATEWAY)

    def pause_writing(self) -> None:
        pass  # request bodies are small here: no upload flow control

    def resume_writing(self) -> None:
        pass

    # -- llhttp callbacks -----------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.request
        assert request is not None
        status = self.parser.get_status_code()
        if status < 200:
            self.reason, self.headers = b"", []  # 100 or 103: the final answer follows
            return
        length: bytes | None = None
        delimited = False  # by a length or chunks, not by the close
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                length, delimited = value, True
            elif lower == b"transfer-encoding":
                delimited = True
        no_body = request.head_only or status in (204, 304)
        keep_alive = request.keep_alive
        if length is None and not no_body:
            if request.http11:
                self.chunked = True
            else:
                keep_alive = False  # an HTTP/1.0 client reads to the close
        self.until_close = not no_body and not delimited
        request.keep_alive = keep_alive
        self.out.append(
            response_head(status, self.reason, self.headers, length, self.chunked, keep_alive)
        )
        if request.head_only:
            # llhttp cannot be told a HEAD answer has no body: done, and not reused.
            self.done, self.reusable = True, False

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.out.append(b"%x\r\n" % len(body) + body + CRLF)
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200 or self.done:
            return
        if self.chunked:
            self.out.append(LAST_CHUNK)
        self.done = True
        self.reusable = self.parser.should_keep_alive()


def request_head(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> bytes:  # fmt: skip
    """The request as sent upstream: end-to-end headers, the body with its length."""
    lines = [method + b" " + url + b" HTTP/1.1"]
    for name, value in headers:
        if name.lower() not in DROPPED:
            lines.append(name + b": " + value)
    if body or method in BODY_METHODS:
        lines.append(b"Content-Length: %d" % len(body))
    lines += [b"", body]
    return CRLF.join(lines)


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                  length: bytes | None, chunked: bool, keep_alive: bool) -> bytes:  # fmt: skip
    """The answer's head as sent to the client: end-to-end headers, the proxy's framing."""
    lines = [b"HTTP/1.1 %d " % status + reason]
    for name, value in headers:
        if name.lower() not in DROPPED:
            lines.append(name + b": " + value)
    if length is not None:
        lines.append(b"Content-Length: " + length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked")
    if not keep_alive:
        lines.append(b"Connection: close")
    return CRLF.join(lines) + CRLF + CRLF


class Client(asyncio.Protocol):
    """One client connection: requests parsed by llhttp and answered in order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.upstream: Upstream | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.key = b""  # the request's Redis key: its device id
        self.closing = False
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.closing = True
            if not self.queue and self.transport is not None:
                self.transport.write(BAD_REQUEST)
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.clear()
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.client is self:
            upstream.client = None
            if upstream.transport is not None:
                upstream.transport.abort()  # its answer has nobody to go to

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    # -- llhttp callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body, self.key = b"", [], [], b"bare:anonymous"

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        for name, value in self.headers:
            lower = name.lower()
            if lower == DEVICE_ID:
                self.key = b"bare:" + value
            elif lower == b"expect" and value.lower() == b"100-continue":
                self.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        method = parser.get_method()
        request = Request(
            request_head(method, self.url, self.headers, b"".join(self.body)),
            self.key,
            head_only=method == b"HEAD",
            keep_alive=parser.should_keep_alive(),
            http11=parser.get_http_version() == "1.1",
        )
        self.queue.append(request)
        if len(self.queue) == 1:
            self.start(request)
        elif len(self.queue) > MAX_QUEUED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    # -- requests -----------------------------------------------------------------------

    def start(self, request: Request) -> None:
        store = self.proxy.store
        if store is None:
            self.proxy.pool.send(request, self)
        else:
            store.call(request.key, self.stored)

    def stored(self, ok: bool) -> None:
        """The request's script call answered (or failed): forward it, or 503."""
        if self.transport is None or not self.queue:
            return
        if ok:
            self.proxy.pool.send(self.queue[0], self)
        else:
            self.failed(STORE_DOWN)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def relay(self, parts: list[bytes]) -> None:
        """What one upstream read produced, in one write."""
        if self.transport is not None:
            self.transport.write(b"".join(parts))

    def answered(self, *, close: bool = False) -> None:
        """The answer to the first queued request is out: the next one, or close."""
        self.upstream = None
        if not self.queue:
            return
        request = self.queue.popleft()
        transport = self.transport
        if transport is None:
            return
        if close or not request.keep_alive:
            self.closing = True
            transport.close()
        elif self.queue:
            self.start(self.queue[0])
        if self.paused and len(self.queue) <= MAX_QUEUED:
            self.paused = False
            transport.resume_reading()

    def failed(self, answer: bytes | None) -> None:
        """No answer from upstream (or Redis): say so and close; None, part of the answer
        is out already: cut the connection, so it never looks complete."""
        self.upstream = None
        self.closing = True
        if self.transport is None:
            return
        if answer is None:
            self.transport.abort()
        else:
            self.transport.write(answer)
            self.transport.close()


class Proxy:
    """What every client connection shares: the upstream pool and, with --redis, the store."""

    def __init__(self, pool: Pool, store: Store | None) -> None:
        self.pool = pool
        self.store = store


def host_port(text: str, default_port: int) -> tuple[str, int]:
    """`127.0.0.1:9000` or `http://127.0.0.1:9000` -> (host, port)."""
    parts = urlsplit(text if "//" in text else f"//{text}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


async def serve(host: str, port: int, upstream: str, redis_url: str | None) -> None:
    loop = asyncio.get_running_loop()
    up_host, up_port = host_port(upstream, 80)
    store = None
    if redis_url:
        store = Store(redis_url)
        await store.open(loop)
    proxy = Proxy(Pool(up_host, up_port, loop), store)
    server = await loop.create_server(lambda: Client(proxy), host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    mode = f"one EVALSHA per request on {redis_url}" if redis_url else "no Redis"
    print(f"bare proxy on {host}:{port} -> {up_host}:{up_port}, {mode}", flush=True)
    await stop.wait()
    server.close()
    if store is not None and store.transport is not None:
        store.transport.close()


def new_loop(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when installed (as the gateway picks it), unless asked for asyncio's own."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def compile_proxy(directory: Path, python: str, *, plain: bool = False) -> tuple[list[str], str]:
    """The argv that runs this proxy, and how it is built: compiled with mypyc into
    `directory`, as the gateway's data plane is (setup.py), or plain Python when `plain` or
    when mypyc cannot build it (a C compiler and the Python headers are needed; the reason
    is in the description)."""
    source = Path(__file__).resolve()
    as_is = [python, str(source)]
    if plain:
        return as_is, "plain Python"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, directory / source.name)
    try:
        done = subprocess.run(
            [python, "-m", "mypyc", source.name],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return as_is, f"plain Python (mypyc failed: {exc})"
    (directory / source.name).unlink()  # the extension module must be what is imported
    if done.returncode != 0 or not list(directory.glob(f"{source.stem}.*.so")):
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        return as_is, f"plain Python (mypyc failed: {said[-1] if said else done.returncode})"
    runner = (
        f"import sys; sys.path.insert(0, {str(directory)!r}); import {source.stem}; "
        f"sys.exit({source.stem}.main())"
    )
    return [python, "-c", runner], "compiled (mypyc)"


def command(base: list[str], port: int, upstream_port: int, redis_url: str | None) -> list[str]:
    """The full argv of a proxy on 127.0.0.1:`port` (`base` from compile_proxy)."""
    argv = [*base, "--port", str(port), "--upstream", f"127.0.0.1:{upstream_port}"]
    return argv + (["--redis", redis_url] if redis_url else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/bare_proxy.py",
        description="A bare reverse proxy: raw asyncio protocols, httptools, a keep-alive "
        "upstream pool; with --redis, one pipelined EVALSHA per request.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--upstream", required=True, help="HOST:PORT or http://HOST:PORT")
    p.add_argument("--redis", metavar="URL", help="one pipelined EVALSHA per request on it")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    a = p.parse_args(argv)
    try:
        with asyncio.Runner(loop_factory=new_loop(a.loop)) as runner:
            runner.run(serve(a.host, a.port, a.upstream, a.redis))
    except OSError as exc:
        print(f"bare proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
