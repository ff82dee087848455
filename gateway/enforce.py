"""Enforcement: identity -> declared body size -> store decision -> a verdict.

Order of checks: identity validation (400) -> declared body size (413) -> blocked (403, no
token taken) -> token bucket (429) -> forward. While Redis answers, Redis decides, but for
one case: a record Redis has just made for an id this process knows blocked means Redis lost
the gateway's data, and the request is 403. When the store cannot be asked, an id this
process knows blocked is still 403; then, while the process does not know the blocked ids
at all (started while Redis was unreachable, with neither a snapshot nor a supervisor to
tell it), a device's request is answered 503 with Retry-After whatever `on_error` says, as
it could be a blocked device's; otherwise `on_error` decides: `open` forwards without
rate-limit headers (they are never invented), `closed` answers 503 with Retry-After.
Transport-free: the data plane passes what it parsed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from gateway import answers
from gateway.answers import Answer
from gateway.config import Settings
from gateway.errors import IdentityError, StoreUnavailable
from gateway.identity import HeaderLookup, IdentityReader, client_ip
from gateway.metrics import Metrics
from gateway.model import Bucket, ReplyCode
from gateway.ratelimit import BucketPolicy, rate_limit_headers, retry_after_seconds
from gateway.store import DeviceStore

log = logging.getLogger(__name__)

ALLOWED_METHODS: Final = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

FORWARD: Final = 0


@dataclass(slots=True, init=False)  # its own __init__: compiled, unlike a generated one
class Verdict:
    """What to do with one request: forward it (status 0) or answer `status` with `reason`.

    `headers` are the rate-limit headers (for a forwarded request, added to the upstream's
    answer); `decision` names the outcome for the access log and the metrics; `client` is the
    client address the request is accounted to (the one anonymous limits key on).
    """

    status: int
    reason: str
    headers: dict[str, str] | None
    decision: str
    device_id: str | None
    client: str

    def __init__(
        self,
        status: int,
        reason: str,
        headers: dict[str, str] | None,
        decision: str,
        device_id: str | None = None,
        client: str = "",
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.decision = decision
        self.device_id = device_id
        self.client = client


class Enforcement(Protocol):
    """What the data plane asks of every request (the Enforcer, or a test's stand-in)."""

    async def check(
        self, method: str, headers: HeaderLookup, peer: str | None, content_length: int | None
    ) -> Verdict: ...


class Enforcer:
    """Everything a decision needs, built once at start from the settings."""

    __slots__ = ("_metrics", "_on_error", "_store", "identity", "max_body", "policy",
                 "registration", "require_id", "trusted", "upload_methods")  # fmt: skip

    def __init__(
        self, settings: Settings, store: DeviceStore, metrics: Metrics | None = None
    ) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._on_error: Literal["open", "closed"] = settings.redis.on_error
        self.identity = IdentityReader(settings.devices)
        self.policy = BucketPolicy(settings.rate_limits)
        self.max_body = settings.limits.max_body_bytes
        self.require_id = settings.devices.require_id
        self.trusted = settings.server.trusted_proxies
        self.upload_methods = settings.devices.data_upload_methods
        limit = settings.devices.registration_limit
        self.registration = Bucket(rate=limit.rate, burst=limit.burst)

    async def check(
        self,
        method: str,
        headers: HeaderLookup,
        peer: str | None,
        content_length: int | None,
    ) -> Verdict:
        """The verdict for one request whose head has been parsed."""
        if method == "CONNECT":
            return _verdict(answers.METHOD, {"Allow": ALLOWED_METHODS}, "method")
        try:
            identity = self.identity.read(headers)
        except IdentityError as exc:
            return Verdict(400, str(exc), None, "invalid")  # the reason names the header
        if identity is None and self.require_id:
            return _verdict(answers.ANONYMOUS, None, "anonymous")
        device_id = None if identity is None else identity.id
        if content_length is not None and content_length > self.max_body:
            return _verdict(answers.BODY_TOO_LARGE, None, "too_large", device_id)

        # Anonymous requests are limited by address, and new devices charged to it.
        ip = client_ip(peer, headers.getall("x-forwarded-for", ()), self.trusted)
        try:
            reply = await self._store.enforce(
                identity,
                ip,
                self.policy.for_request(identity is not None),
                upload=method in self.upload_methods,
                registration=self.registration,
            )
        except StoreUnavailable as exc:
            self._metrics.store_failures += 1
            blocked = self._store.blocked
            if device_id is not None and device_id in blocked:
                log.warning("store unavailable (on_error=%s): %s", self._on_error, exc)
                # Redis cannot decide: this process's copy of the blocked ids still does.
                return _verdict(answers.BLOCKED, None, "blocked", device_id)
            if device_id is not None and not blocked.known:
                # Any device could be a blocked one: forwarding it would undo its block. An
                # anonymous request is no device's, so on_error still decides for it.
                log.warning("store unavailable and the blocked ids not known yet: %s", exc)
                return _verdict(
                    answers.STORE_UNAVAILABLE, {"Retry-After": "1"}, "store_down_unknown", device_id
                )
            log.warning("store unavailable (on_error=%s): %s", self._on_error, exc)
            if self._on_error == "closed":
                return _verdict(
                    answers.STORE_UNAVAILABLE, {"Retry-After": "1"}, "store_down_closed", device_id
                )
            return Verdict(FORWARD, "", None, "store_down_open", device_id, ip)

        if reply.outcome is ReplyCode.BLOCKED:
            return _verdict(answers.BLOCKED, None, "blocked", device_id)
        if reply.new_device and device_id is not None and device_id in self._store.blocked:
            # Redis made a record for an id this process knows blocked (a blocked id always
            # has one): Redis lost the gateway's data. Refuse it, and have the loss found
            # and the blocks restored now rather than at the next poll.
            self._store.blocked.suspect_reset()
            return _verdict(answers.BLOCKED, None, "blocked", device_id)
        rate_headers = rate_limit_headers(reply)
        if reply.outcome is ReplyCode.LIMITED:
            rate_headers["Retry-After"] = str(retry_after_seconds(reply))
            if reply.policy == "registration":
                return _verdict(answers.UNREGISTERED, rate_headers, "unregistered", device_id)
            return _verdict(answers.LIMITED, rate_headers, "limited", device_id)
        return Verdict(FORWARD, "", rate_headers, "allow", device_id, ip)


def _verdict(
    answer: Answer, headers: dict[str, str] | None, decision: str, device_id: str | None = None
) -> Verdict:
    """A verdict that answers the request itself, from the catalogue of gateway answers."""
    return Verdict(answer.status, answer.reason, headers, decision, device_id)
