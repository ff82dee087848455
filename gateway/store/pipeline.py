"""One Lua script called over a dedicated, pipelined Redis connection (the data plane's path).

redis-py costs about 100 us of CPU per call in its Python layer. Here every call made in the
same event-loop tick is packed with hiredis and written to the socket in one write; Redis
answers in order, so replies are matched to callers first-in first-out and parsed by
hiredis' C reader. The connection is opened on first use and again after any failure.

Where it connects is asked of `resolve` each time it opens: a fixed server, or the
primary the sentinels name now (gateway.store.clients); a cluster keeps one pipeline per
primary (gateway.store.cluster_scripts).

Failure handling, at one place: a reply that does not come within `timeout` of its batch's
write, a reset, or a refused connection fails every call in flight with `StoreUnavailable`
and drops the connection (a reply stream can never be matched again once one reply is
missing). A `READONLY`, `LOADING` or `MASTERDOWN` reply means the server is not (or no
longer) a usable primary: the same, so the next call resolves the primary again. A
`NOSCRIPT` reply (Redis restarted or flushed its script cache) loads the script on this
connection and sends the call again, once. `MOVED`, `ASK` and `TRYAGAIN` fail that call
alone with `StoreRedirect`, for the cluster's router to follow.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, cast

import hiredis
from redis.connection import parse_url as _parse_url

from gateway.errors import StoreRedirect, StoreUnavailable

MAX_IN_FLIGHT: Final = 20_000  # calls waiting for a reply; past it, refuse at once
# Replies of a server that is not a writable primary (any more): drop the connection.
_NOT_PRIMARY: Final = ("READONLY", "LOADING", "MASTERDOWN")
_REDIRECTS: Final = ("MOVED", "ASK", "TRYAGAIN")

parse_url = cast(Callable[[str], dict[str, Any]], _parse_url)
# hiredis' stub types the argument tuple too narrowly: typed here once, not per call.
_pack_command = cast(Callable[[tuple[str | int | bytes, ...]], bytes], hiredis.pack_command)


def pack(*parts: str | int | bytes) -> bytes:
    """One command in RESP, packed by hiredis."""
    return _pack_command(parts)


class ConnectTo:
    """Where and how to open one connection: a TCP address or a Unix socket, TLS, AUTH, db."""

    __slots__ = ("db", "host", "password", "path", "port", "tls", "username")

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        *,
        path: str | None = None,
        tls: bool = False,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.tls = tls
        self.username = username
        self.password = password
        self.db = db

    @classmethod
    def from_url(cls, url: str) -> ConnectTo:
        """A single server's redis://, rediss:// or unix:// URL, as redis-py reads it."""
        p = parse_url(url)
        return cls(
            str(p.get("host", "localhost")),
            int(p.get("port", 6379)),
            path=p.get("path"),
            tls=p.get("connection_class") is not None and "SSL" in str(p["connection_class"]),
            username=p.get("username"),
            password=p.get("password"),
            db=int(p.get("db") or 0),
        )

    def __repr__(self) -> str:
        return f"ConnectTo({self.path or f'{self.host}:{self.port}'})"


Resolve = Callable[[], Awaitable[ConnectTo]]


def auth(username: str | None, password: str | None) -> list[tuple[str | int | bytes, ...]]:
    """The AUTH a connection opens with: none without a password (also gateway.store.
    node_query's one-off connections)."""
    if not password:
        return []
    return [("AUTH", username, password) if username else ("AUTH", password)]


class _Call:
    """One caller's place in the reply stream."""

    __slots__ = ("command", "future", "loads_script", "retried", "sent_at")

    def __init__(
        self, command: bytes, future: asyncio.Future[Any] | None, *, loads_script: bool = False
    ) -> None:
        self.command = command
        self.future = future  # None for the connection's own commands (AUTH, SCRIPT LOAD)
        self.loads_script = loads_script
        self.retried = False
        self.sent_at = 0.0


class _Protocol(asyncio.Protocol):
    """Feeds replies to the owner; tells it when the connection is gone."""

    def __init__(self, owner: ScriptPipeline) -> None:
        self._owner = owner
        self._reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        owner = self._owner
        # Stop as soon as the owner dropped this connection (a failed setup, a timeout):
        # replies still buffered here belong to calls that were already failed.
        while owner._protocol is self and (reply := self._reader.gets()) is not False:
            owner._on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._on_lost(self, exc)


class ScriptPipeline:
    """Calls one Lua script by EVALSHA, batching concurrent calls into one write per tick."""

    def __init__(self, resolve: Resolve, script: str, *, timeout: float) -> None:
        self._resolve = resolve
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()  # Redis names scripts by SHA1
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._pending: deque[_Call] = deque()
        self._outbox: list[_Call] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._last_error: StoreUnavailable | None = None
        self._reloading = False  # a SCRIPT LOAD is queued or in flight on this connection
        # Python 3.11's get_running_loop() calls getpid() each time: keep the one we run on.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def sha(self) -> str:
        """The script's SHA1, as Redis knows it."""
        return self._sha.decode()

    @classmethod
    def fixed(cls, target: ConnectTo, script: str, *, timeout: float) -> ScriptPipeline:
        """A pipeline to one server that never moves (a cluster's primary is one too: when
        its slots move, the router makes another)."""

        async def resolve() -> ConnectTo:
            return target

        return cls(resolve, script, timeout=timeout)

    @classmethod
    def for_url(cls, url: str, script: str, *, timeout: float) -> ScriptPipeline:
        """A pipeline to the one server a redis://, rediss:// or unix:// URL names."""
        return cls.fixed(ConnectTo.from_url(url), script, timeout=timeout)

    async def call(
        self, keys: Sequence[str], args: Sequence[str | int], *, asking: bool = False
    ) -> Any:
        """Run the script; raises StoreUnavailable when Redis cannot answer in time.

        `asking` sends ASKING ahead of it (a cluster's ASK redirect, followed once)."""
        if self._transport is None:
            await self._connect()
        if len(self._pending) + len(self._outbox) >= MAX_IN_FLIGHT:
            raise StoreUnavailable("too many store calls in flight")
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        command = _pack_command((b"EVALSHA", self._sha, len(keys), *keys, *args))
        if asking:
            self._outbox.append(_Call(pack("ASKING"), None))
        self._outbox.append(_Call(command, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    async def connect(self) -> None:
        """Open the connection now (it opens on first use otherwise)."""
        if self._transport is None:
            await self._connect()

    async def close(self) -> None:
        """Close the connection; calls in flight fail."""
        self._closed = True
        self._fail_all(StoreUnavailable("store closed"))

    # -- connection ----------------------------------------------------------------------

    async def _connect(self) -> None:
        if self._closed:
            raise StoreUnavailable("store closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        if self._transport is None:
            # Dropped again before this caller resumed (e.g. the session setup was refused).
            raise self._last_error or StoreUnavailable("Redis connection lost")

    async def _open(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                to = await self._resolve()
                if to.path is not None:
                    transport, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(self), to.path
                    )
                else:
                    transport, protocol = await loop.create_connection(
                        lambda: _Protocol(self),
                        to.host,
                        to.port,
                        ssl=ssl.create_default_context() if to.tls else None,
                    )
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"Redis connect failed: {exc!r}") from exc
        self._transport = transport
        self._protocol = protocol
        self._last_error = None
        # Session setup and the script travel ahead of any call on this connection.
        setup = auth(to.username, to.password)
        if to.db:
            setup.append(("SELECT", to.db))
        setup.append(("SCRIPT", "LOAD", self._script))
        self._outbox[:0] = [_Call(pack(*c), None) for c in setup]
        self._reloading = False
        self._flush()

    # -- writing -------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            self._fail_all(self._last_error or StoreUnavailable("Redis connection lost"))
            return
        batch, self._outbox = self._outbox, []
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        for call in batch:
            call.sent_at = now
        self._pending.extend(batch)
        transport.write(b"".join([c.command for c in batch]))
        if self._timer is None:
            self._timer = loop.call_later(self._timeout, self._expired)

    def _expired(self) -> None:
        """The timer aims at the oldest unanswered call's deadline; past it, give up."""
        self._timer = None
        if not self._pending:
            return
        loop = self._loop or asyncio.get_running_loop()
        deadline = self._pending[0].sent_at + self._timeout
        if loop.time() >= deadline:
            self._fail_all(StoreUnavailable(f"Redis did not answer within {self._timeout:g} s"))
        else:
            self._timer = loop.call_at(deadline, self._expired)

    # -- reading -------------------------------------------------------------------------

    def _on_reply(self, reply: Any) -> None:
        call = self._pending.popleft()
        if not self._pending and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if call.loads_script:
            self._reloading = False
        future = call.future
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if future is None:
                # AUTH/SELECT/SCRIPT LOAD refused: this connection is unusable.
                self._fail_all(StoreUnavailable(f"Redis refused the session setup: {message}"))
                return
            if message.startswith("NOSCRIPT") and not call.retried:
                call.retried = True
                if not self._reloading:
                    # Every call in flight meets NOSCRIPT: the script is loaded once, ahead
                    # of all of them (Redis answers in order).
                    self._reloading = True
                    load = pack("SCRIPT", "LOAD", self._script)
                    self._outbox.append(_Call(load, None, loads_script=True))
                self._outbox.append(call)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    (self._loop or asyncio.get_running_loop()).call_soon(self._flush)
                return
            if message.startswith(_REDIRECTS):
                if not future.done():
                    future.set_exception(StoreRedirect(message))
                return
            if message.startswith(_NOT_PRIMARY):
                # A replica, a demoted primary or one still loading: every call in flight
                # meets the same, and the next connection resolves the primary again.
                error = StoreUnavailable(f"Redis is not a usable primary: {message}")
                if not future.done():
                    future.set_exception(error)
                self._fail_all(error)
                return
            if not future.done():
                future.set_exception(StoreUnavailable(f"Redis error: {message}"))
            return
        if future is not None and not future.done():
            future.set_result(reply)

    def _on_lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._transport = None
            self._protocol = None
            self._fail_all(StoreUnavailable(f"Redis connection lost: {exc!r}"))

    def _fail_all(self, error: StoreUnavailable) -> None:
        """Fail every call in flight and drop the connection (replies can't be matched)."""
        self._last_error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        calls = [*self._pending, *self._outbox]
        self._pending.clear()
        self._outbox.clear()
        transport, self._transport, self._protocol = self._transport, None, None
        if transport is not None:
            transport.abort()
        for call in calls:
            if call.future is not None and not call.future.done():
                call.future.set_exception(error)
