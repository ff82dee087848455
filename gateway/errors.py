"""The gateway's exception tree.

    GatewayError                 base of every error the gateway raises on purpose;
    │                            raised only through its subclasses
    ├── ConfigError              bad configuration: names the file and the dotted key path
    ├── IdentityError            a device identification header is invalid (-> 400)
    ├── RequestRefused           a request the data plane refuses itself: a size limit, the
    │                            HTTP version, the target form, the framing (-> .status)
    ├── BadRequest               a request the admin API refuses: an id, a query parameter,
    │                            a body (-> 400)
    ├── StoreError               the store failed; raised only through its subclass
    │   └── StoreUnavailable     the store could not be asked (down, slow, refused) -> on_error
    │       └── StoreRedirect    a cluster node sent the call elsewhere (MOVED, ASK,
    │                            TRYAGAIN): followed once by the router, else on_error
    ├── SnapshotError            a blocked-ids snapshot file cannot be used (ignored, with a
    │                            warning saying why)
    ├── UpstreamError            the upstream could not give an answer; raised only through
    │   │                        its subclasses
    │   ├── UpstreamUnreachable      refused, reset, connect timeout (-> 502)
    │   ├── PoolExhausted            every upstream connection is busy (-> 503)
    │   ├── ClientBusy               one client address holds its share of the pool (-> 429)
    │   └── UpstreamResponseInvalid  the upstream's answer is malformed or over the limits
    │                                (-> 502)
    ├── AdminClientError         the `gateway devices ...` CLI could not talk to the admin API
    ├── AdminTokenError          no admin token configured, and a generated one can be neither
    │                            saved nor shown: the gateway refuses to start
    └── WorkerFailed             a data-plane worker process could not start

Where they end: the data plane answers IdentityError and StoreUnavailable in
`gateway.enforce` (the verdict), RequestRefused in its connection and the upstream errors in
its exchange; the admin API answers BadRequest and StoreUnavailable in its error middleware;
the CLI prints ConfigError, AdminTokenError, WorkerFailed and AdminClientError and exits
non-zero; a SnapshotError is logged and the snapshot ignored.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the file and the key path."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(f"{where}{message}")


class IdentityError(GatewayError):
    """A device identification header is invalid; the message names the header."""

    def __init__(self, header: str, message: str) -> None:
        self.header = header
        super().__init__(f"Invalid {header} header: {message}")


class RequestRefused(GatewayError):
    """A request the data plane refuses itself (a size limit, the version, the target form,
    the framing): answered with `status` and `reason`, never forwarded."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BadRequest(GatewayError):
    """A request the admin API rejects with 400; the message says why."""


class StoreError(GatewayError):
    """The store failed."""


class StoreUnavailable(StoreError):
    """The store could not be asked in time; raised only in gateway.store."""


class StoreRedirect(StoreUnavailable):
    """A Redis Cluster node answered MOVED, ASK or TRYAGAIN: the slot is served elsewhere,
    or is moving. Raised by the pipelined connection; the cluster's router follows it once,
    and a redirect it does not follow is, like its base, a store that could not be asked."""

    def __init__(self, reply: str) -> None:
        super().__init__(f"Redis redirected the call: {reply}")
        kind, _, rest = reply.partition(" ")
        slot, _, address = rest.partition(" ")
        self.kind = kind  # MOVED, ASK or TRYAGAIN
        self.slot = int(slot) if slot.isdigit() else -1
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port) if port.isdigit() else 0


class SnapshotError(GatewayError):
    """A blocked-ids snapshot file is unreadable, corrupt, or of another Redis, prefix or
    format; the message says which."""


class UpstreamError(GatewayError):
    """The upstream could not give an answer."""


class UpstreamUnreachable(UpstreamError):
    """The upstream refused or reset the connection, or connecting timed out."""


class PoolExhausted(UpstreamError):
    """Every upstream connection is busy and the pool may not open another."""


class ClientBusy(UpstreamError):
    """One client address holds as many upstream connections as it may."""


class UpstreamResponseInvalid(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1 or its head is over the limits."""


class AdminClientError(GatewayError):
    """The ops CLI could not complete a call to the admin API."""


class AdminTokenError(GatewayError):
    """No admin token is configured and a generated one has nowhere to go (no state file, no
    terminal); the message names the fix."""


class WorkerFailed(GatewayError):
    """A data-plane worker process of `gateway run --workers` could not start."""
