"""One Lua script called over a dedicated, pipelined Redis connection (the data plane's path).

redis-py costs about 100 us of CPU per call in its Python layer. Here every call made in the
same event-loop tick is packed with hiredis and written to the socket in one write; Redis
answers in order, so replies are matched to callers first-in first-out and parsed by
hiredis' C reader. The connection is opened on first use and again after any failure.

With a batch variant of the script (`Batching`: enforce_batch.lua for enforce.lua), the calls
of one tick are not N commands but ONE: the batch script runs each call as the script would
alone, in order, and answers a list of N replies (at most `BATCH_MAX` calls a batch). Redis
then dispatches one command and reads the clock once for the tick, not once per request; a
lone call is still sent as the plain script. A failed entry of a batch fails its call alone
(on a cluster, where a batch spans the node's slots, it is sent again alone, as the plain
script with its keys declared, so that a moved slot answers MOVED or ASK to the router).

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
BATCH_MAX: Final = 128  # calls in one batch script call (Redis runs a batch without a pause)
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


class Batching:
    """A batch variant of the pipeline's script: it takes the calls of one tick and answers
    one reply (or error) per call, in order. Its arguments: KEYS, every call's keys one call
    after the other; ARGV[1] the number of calls n, ARGV[2..2n+1] each call's number of keys
    and of arguments, then every call's arguments. `cross_slot`: the script is a cluster
    node's, flagged to reach the keys of all its slots (gateway.store.scripts.CROSS_SLOT),
    and its keys travel in ARGV."""

    __slots__ = ("cross_slot", "script")

    def __init__(self, script: str, *, cross_slot: bool = False) -> None:
        self.script = script
        self.cross_slot = cross_slot


class _Call:
    """One caller's place in the reply stream, or a batch's (its `members`)."""

    __slots__ = ("args", "command", "future", "keys", "loads_script", "members", "retried",
                 "sent_at")  # fmt: skip

    def __init__(
        self,
        command: bytes | None,
        future: asyncio.Future[Any] | None,
        *,
        loads_script: bool = False,
        keys: Sequence[str] = (),
        args: Sequence[str | int] = (),
        members: list[_Call] | None = None,
    ) -> None:
        # None until the flush packs it: alone, or as a member of a batch.
        self.command = command
        self.future = future  # None for the connection's own commands and for a batch
        self.loads_script = loads_script
        self.keys = keys
        self.args = args
        self.members = members  # a batch: the calls it carries, in order
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

    def __init__(
        self, resolve: Resolve, script: str, *, timeout: float, batch: Batching | None = None
    ) -> None:
        self._resolve = resolve
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()  # Redis names scripts by SHA1
        self._batch_script = b"" if batch is None else batch.script.encode()
        self._batch_sha = hashlib.sha1(self._batch_script).hexdigest().encode()
        self._batching = batch is not None
        self._cross_slot = batch is not None and batch.cross_slot
        self._waiting = 0  # calls waiting for their answer (MAX_IN_FLIGHT)
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
    def fixed(
        cls, target: ConnectTo, script: str, *, timeout: float, batch: Batching | None = None
    ) -> ScriptPipeline:
        """A pipeline to one server that never moves (a cluster's primary is one too: when
        its slots move, the router makes another)."""

        async def resolve() -> ConnectTo:
            return target

        return cls(resolve, script, timeout=timeout, batch=batch)

    @classmethod
    def for_url(
        cls, url: str, script: str, *, timeout: float, batch: Batching | None = None
    ) -> ScriptPipeline:
        """A pipeline to the one server a redis://, rediss:// or unix:// URL names."""
        return cls.fixed(ConnectTo.from_url(url), script, timeout=timeout, batch=batch)

    async def call(
        self, keys: Sequence[str], args: Sequence[str | int], *, asking: bool = False
    ) -> Any:
        """Run the script; raises StoreUnavailable when Redis cannot answer in time.

        `asking` sends ASKING ahead of it (a cluster's ASK redirect, followed once)."""
        if self._transport is None:
            await self._connect()
        if self._waiting >= MAX_IN_FLIGHT:  # calls, not commands: a batch carries many
            raise StoreUnavailable("too many store calls in flight")
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if asking:
            # ASKING holds for the next command only: the call goes alone, right behind it.
            self._outbox.append(_Call(pack("ASKING"), None))
            self._outbox.append(_Call(self._alone(keys, args), future))
        else:
            self._outbox.append(_Call(None, future, keys=keys, args=args))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        self._waiting += 1
        try:
            return await future
        finally:
            self._waiting -= 1

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
        if self._batching:
            setup.append(("SCRIPT", "LOAD", self._batch_script))
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
        outbox, self._outbox = self._outbox, []
        sent = self._packed(outbox)
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        for call in sent:
            call.sent_at = now
        self._pending.extend(sent)
        transport.write(b"".join([c.command for c in sent]))  # type: ignore[misc]
        if self._timer is None:
            self._timer = loop.call_later(self._timeout, self._expired)

    def _packed(self, outbox: list[_Call]) -> list[_Call]:
        """The outbox as the commands to write: each call not packed yet goes alone, or with
        batching, with the others of its run in batches of at most BATCH_MAX."""
        if not self._batching:
            for call in outbox:
                if call.command is None:
                    call.command = self._alone(call.keys, call.args)
            return outbox
        sent: list[_Call] = []
        run: list[_Call] = []
        for call in outbox:
            if call.command is None:
                run.append(call)
                if len(run) == BATCH_MAX:
                    sent.append(self._batched(run))
                    run = []
                continue
            if run:
                sent.append(self._batched(run))
                run = []
            sent.append(call)
        if run:
            sent.append(self._batched(run))
        return sent

    def _alone(self, keys: Sequence[str], args: Sequence[str | int]) -> bytes:
        """One call as the plain script, its keys declared."""
        return _pack_command((b"EVALSHA", self._sha, len(keys), *keys, *args))

    def _batched(self, run: list[_Call]) -> _Call:
        """A run of calls as one batch script call (a lone call as the plain script)."""
        if len(run) == 1:
            call = run[0]
            call.command = self._alone(call.keys, call.args)
            return call
        keys: list[str] = []
        counts: list[int] = []
        args: list[str | int] = []
        for call in run:
            keys.extend(call.keys)
            args.extend(call.args)
            counts.append(len(call.keys))
            counts.append(len(call.args))
        if self._cross_slot:  # the keys in ARGV, behind their number (CROSS_SLOT prologue)
            parts = (b"EVALSHA", self._batch_sha, 0, len(keys), *keys, len(run), *counts, *args)
        else:
            parts = (b"EVALSHA", self._batch_sha, len(keys), *keys, len(run), *counts, *args)
        return _Call(_pack_command(parts), None, members=run)

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
        members = call.members
        if members is not None:
            self._on_batch_reply(call, members, reply)
            return
        if call.future is None:
            if isinstance(reply, hiredis.ReplyError):
                # AUTH/SELECT/SCRIPT LOAD refused: this connection is unusable.
                self._fail_all(StoreUnavailable(f"Redis refused the session setup: {reply}"))
            return
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            self._send_again(call)
            return
        self._settle(call, reply)

    def _on_batch_reply(self, batch: _Call, members: list[_Call], reply: Any) -> None:
        """A batch's reply: each entry settles its call; an error of the whole batch (the
        script missing, a server that is no primary) is every member's."""
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("NOSCRIPT"):
                self._send_again(batch)
                return
            message = str(reply)
            not_primary = message.startswith(_NOT_PRIMARY)
            what = "Redis is not a usable primary" if not_primary else "Redis error"
            error = StoreUnavailable(f"{what}: {message}")
            _fail(batch, error)
            if not_primary:
                self._fail_all(error)  # the calls in flight behind it meet the same
            return
        if not isinstance(reply, list) or len(reply) != len(members):
            count = len(members)
            _fail(batch, StoreUnavailable(f"Redis answered a batch of {count} with {reply!r}"))
            return
        for member, entry in zip(members, reply, strict=True):
            if (
                self._cross_slot
                and isinstance(entry, hiredis.ReplyError)
                and not str(entry).startswith(_NOT_PRIMARY)
                and not member.retried
            ):
                # On a cluster, most likely a key of a slot this node no longer (or not yet
                # fully) serves: alone, with its keys declared, Redis answers MOVED or ASK.
                member.retried = True
                member.command = self._alone(member.keys, member.args)
                self._queue(member)
                continue
            self._settle(member, entry)

    def _settle(self, call: _Call, reply: Any) -> None:
        """Answer one caller: its reply, or its error as the exception the callers expect."""
        future = call.future
        if future is None or future.done():
            return
        if not isinstance(reply, hiredis.ReplyError):
            future.set_result(reply)
            return
        message = str(reply)
        if message.startswith(_REDIRECTS):
            future.set_exception(StoreRedirect(message))
        elif message.startswith(_NOT_PRIMARY):
            # A replica, a demoted primary or one still loading: every call in flight meets
            # the same, and the next connection resolves the primary again.
            error = StoreUnavailable(f"Redis is not a usable primary: {message}")
            future.set_exception(error)
            self._fail_all(error)
        else:
            future.set_exception(StoreUnavailable(f"Redis error: {message}"))

    def _send_again(self, call: _Call) -> None:
        """NOSCRIPT (Redis restarted or flushed its scripts): load them once, ahead of every
        call in flight (each meets NOSCRIPT: Redis answers in order), and send the call again,
        once; a second NOSCRIPT fails it."""
        if call.retried:
            _fail(call, StoreUnavailable("Redis error: NOSCRIPT again after loading the script"))
            return
        call.retried = True
        if not self._reloading:
            self._reloading = True
            self._outbox.append(_Call(pack("SCRIPT", "LOAD", self._script), None))
            if self._batching:
                self._outbox.append(_Call(pack("SCRIPT", "LOAD", self._batch_script), None))
            self._outbox[-1].loads_script = True
        self._queue(call)

    def _queue(self, call: _Call) -> None:
        """Put a call (packed already) in the outbox again, for this tick's flush."""
        self._outbox.append(call)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush)

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
            _fail(call, error)


def _fail(call: _Call, error: StoreUnavailable) -> None:
    """Fail the caller of `call`, or of each call a batch carries, that still waits."""
    for member in call.members or (call,):
        if member.future is not None and not member.future.done():
            member.future.set_exception(error)
