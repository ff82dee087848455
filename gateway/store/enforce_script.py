"""The data plane's client of enforce.lua: its keys and arguments, the circuit breaker, and
its reply turned into a `EnforceReply`; one call per request. A new device with a
registration budget is one call too where every key lives on one node (one server,
Sentinel, the embedded store); on a cluster, where the address's budget is on another
slot, it is three: the device's (asks), the budget's, the device's (registers).

Kept apart from the admin side (`gateway.store.store.Store`) so that the compiled build
(setup.py) compiles it with the rest of the request's path: every request runs it, the
admin side is redis-py and needs no compiling. `Store.enforce` is this class's `enforce`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, cast

from gateway.errors import StoreUnavailable
from gateway.model import Bucket, DeviceIdentity, EnforceReply, ReplyCode
from gateway.store.breaker import CircuitBreaker
from gateway.store.keys import SEPARATOR, KeySchema
from gateway.typedefs import Clock

_CODES: Final = tuple(ReplyCode)  # reply code -> ReplyCode, without the enum constructor
_POLICY_DEVICE: Final = "device"
_POLICY_ANONYMOUS: Final = "anonymous"
_POLICY_REGISTRATION: Final = "registration"
_REFUSED_NEW: Final = 2  # reply[6]: the registration budget refused a new device
DEVICE_CACHE: Final = 8192  # devices whose keys and declared fields are kept, dropped at once

ScriptCall = Callable[[Sequence[str], Sequence[str | int]], Awaitable[Any]]


class ScriptCaller(Protocol):
    """A pipelined caller of enforce.lua: one server's (gateway.store.pipeline) or a
    cluster's (gateway.store.cluster_scripts)."""

    async def call(self, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...


class EnforceScript:
    """enforce.lua per request: over the pipelined connection, or `fallback` (memory://)."""

    def __init__(
        self,
        keys: KeySchema,
        breaker: CircuitBreaker | None,
        *,
        pipeline: ScriptCaller | None,
        fallback: ScriptCall,
        history_size: int,
        clock: Clock | None,
        one_node: bool = True,
        device_cache: int = DEVICE_CACHE,
    ) -> None:
        self._keys = keys
        self._breaker = breaker
        self._pipeline = pipeline
        self._fallback = fallback  # bounded in time, failures as StoreUnavailable
        self._history_size = str(history_size)
        self._clock = clock
        self._one_node = one_node  # every key on one node: a registration is one call
        # Device id -> (the identity last seen for it, its KEYS, its declared fields joined):
        # a device's next request with the same identity object (gateway.identity keeps them)
        # builds neither again.
        self._devices: dict[str, tuple[DeviceIdentity, tuple[str, str, str, str], str]] = {}
        self._device_cache = device_cache

    def now(self) -> str:
        """The scripts' clock argument: "" (they read Redis TIME), or the injected clock."""
        return "" if self._clock is None else str(self._clock())

    async def enforce(
        self,
        identity: DeviceIdentity | None,
        client_ip: str,
        bucket: Bucket,
        *,
        upload: bool,
        registration: Bucket | None = None,
    ) -> EnforceReply:
        """Run enforce.lua once: block check, token bucket, upsert, history, indexes.

        With a `registration` budget, a device never seen is charged to its address's budget
        (a bucket under the address's own hash tag) first, and a refused device leaves no
        record. A known device costs exactly one call, a new one too on one node.
        """
        if identity is None:
            keys: Sequence[str] = (self._keys.anonymous_bucket(client_ip),)
            args: tuple[str | int, ...] = (self.now(), bucket.rate_milli, bucket.burst)
            return _reply(await self.call(keys, args), bucket, _POLICY_ANONYMOUS)
        device_keys, declared = self._device(identity)
        keys = device_keys
        args = (
            self.now(),
            bucket.rate_milli,
            bucket.burst,
            "1" if upload else "0",
            self._history_size,
            identity.id,
            declared,
            "0" if registration is None else "1",
        )
        if registration is not None and self._one_node:
            keys = (*keys, self._keys.registration_bucket(client_ip))
            args = (*args[:-1], registration.rate_milli, registration.burst)
            reply = await self.call(keys, args)
            if reply[6] == _REFUSED_NEW:
                return _reply(reply, registration, _POLICY_REGISTRATION)
            return _reply(reply, bucket, _POLICY_DEVICE)
        reply = await self.call(keys, args)
        if registration is not None and reply[0] == ReplyCode.UNREGISTERED:
            budget = await self.call(
                (self._keys.registration_bucket(client_ip),),
                (self.now(), registration.rate_milli, registration.burst),
            )
            if budget[0] != ReplyCode.ALLOW:
                return _reply(budget, registration, _POLICY_REGISTRATION)
            reply = await self.call(keys, (*args[:-1], "0"))
        return _reply(reply, bucket, _POLICY_DEVICE)

    def _device(self, identity: DeviceIdentity) -> tuple[tuple[str, str, str, str], str]:
        """The device's KEYS and ARGV[7] (the declared fields in DEVICE_FIELDS order, "" when
        absent, joined), kept for the device's next request."""
        device_id = identity.id
        known = self._devices.get(device_id)
        if known is not None and known[0] is identity:
            return known[1], known[2]
        keys = known[1] if known is not None else self._keys.enforce(device_id)
        declared = SEPARATOR.join([value or "" for value in identity.fields()])
        if known is None and len(self._devices) >= self._device_cache:
            self._devices.clear()
        self._devices[device_id] = (identity, keys, declared)
        return keys, declared

    async def call(self, keys: Sequence[str], args: Sequence[str | int]) -> list[int]:
        """One enforce.lua call, through the circuit breaker (a cluster's caller keeps one
        per node itself: one failing primary must not skip the others)."""
        breaker = self._breaker
        if breaker is None:
            assert self._pipeline is not None
            return cast(list[int], await self._pipeline.call(keys, args))
        if not breaker.allow():
            raise StoreUnavailable("Redis is failing; the circuit breaker skips it for now")
        try:
            if self._pipeline is not None:
                # Bounded by the pipeline's own deadline; it raises StoreUnavailable itself.
                reply = await self._pipeline.call(keys, args)
            else:
                reply = await self._fallback(keys, args)
        except StoreUnavailable:
            breaker.failure()
            raise
        except BaseException:
            breaker.abandon()  # cancelled: neither a success nor a failure of Redis
            raise
        breaker.success()
        return cast(list[int], reply)  # integers, as hiredis (and fakeredis) read them


def _reply(reply: list[int], bucket: Bucket, policy: str) -> EnforceReply:
    outcome, remaining, retry_after, full_after, rate_milli, burst, new = reply
    applied = (
        bucket
        if rate_milli == bucket.rate_milli and burst == bucket.burst
        else Bucket(rate=rate_milli / 1000, burst=burst)
    )
    return EnforceReply(
        _CODES[outcome], remaining, retry_after, full_after, applied, policy, new == 1
    )
