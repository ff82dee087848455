"""The gateway's exception tree.

    GatewayError
    ├── ConfigError            bad configuration: names the file and the dotted key path
    ├── IdentityError          a device identification header is invalid (-> 400)
    ├── StoreError             anything that went wrong talking to the store
    │   └── StoreUnavailable   the store could not be asked (down, slow, refused) -> on_error
    ├── SnapshotError          a blocked-ids snapshot file cannot be used (ignored, with a
    │                          warning saying why)
    ├── UpstreamError          the upstream could not give an answer
    │   ├── UpstreamUnreachable  refused, reset, connect timeout (-> 502)
    │   └── UpstreamTimeout      the whole request took too long (-> 504)
    ├── AdminClientError       the `gateway devices ...` CLI could not talk to the admin API
    ├── AdminTokenError        no admin token configured, and a generated one can be neither
    │                          saved nor shown: the gateway refuses to start
    └── WorkerFailed           a data-plane worker process could not start

Exceptions become HTTP answers in two places only: the enforce middleware and the
proxy handler (and, for the admin API, its own error middleware).
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


class StoreError(GatewayError):
    """The store failed."""


class StoreUnavailable(StoreError):
    """The store could not be asked in time; raised only in gateway.store."""


class SnapshotError(GatewayError):
    """A blocked-ids snapshot file is unreadable, corrupt, or of another Redis, prefix or
    format; the message says which."""


class UpstreamError(GatewayError):
    """The upstream could not give an answer."""

    status = 502


class UpstreamUnreachable(UpstreamError):
    """The upstream refused or reset the connection, or connecting timed out."""

    status = 502


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the whole-request timeout."""

    status = 504


class AdminClientError(GatewayError):
    """The ops CLI could not complete a call to the admin API."""


class AdminTokenError(GatewayError):
    """No admin token is configured and a generated one has nowhere to go (no state file, no
    terminal); the message names the fix."""


class WorkerFailed(GatewayError):
    """A data-plane worker process of `gateway run --workers` could not start."""
